"""Decode + validate one sealed raw batch's content: pydantic v2 against msgspec, µs per message.

The issue asked the contract's library to be chosen by measurement. Both candidates implement the
same rules (ids match the id pattern, exactly the contract's keys, integer timestamps inside the
window, equal-length t/v, finite values, a non-empty sensor map) and are timed two ways:
`dict`: from the dict orjson already parsed (how the bus worked before), and `bytes`: decoding the
plaintext straight into the typed model in one pass. Run: `uv run python tests/bench/validation.py`.
"""

import math
import statistics
import sys
import time
from typing import Annotated

import orjson

ID = r"^[A-Za-z0-9_-]{1,64}$"
MAX_SAMPLES = 1_000_000


def make_inner(sensors: int, readings: int) -> bytes:
    start = 1_795_533_424_000
    data = {
        "device": "greenhouse-1",
        "window": {"start": start, "size": 1000},
        "sensors": {
            f"sensor-{s}": {
                "unit": "degC",
                "t": [start + i * (1000 // readings) for i in range(readings)],
                "v": [21.0 + ((i * 7919 + s) % 1000) / 997 for i in range(readings)],
            }
            for s in range(sensors)
        },
    }
    inner = {"topic": "iotpipe/v2/raw/greenhouse-1", "src": "sensor-reader/a", "boot": "b" * 16, "seq": 1}
    return orjson.dumps({**inner, "ts": start, "data": data})


def pydantic_candidate():  # type: ignore[no-untyped-def]
    from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

    Id = Annotated[str, Field(pattern=ID)]
    strict = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)

    class Window(BaseModel):
        model_config = strict
        start: Annotated[int, Field(ge=0)]
        size: Annotated[int, Field(gt=0)]

    class Series(BaseModel):
        model_config = strict
        unit: Annotated[str, Field(max_length=32)]
        t: list[StrictInt]
        v: list[float]

        @model_validator(mode="after")
        def _lengths(self) -> "Series":
            if len(self.t) != len(self.v) or not 0 < len(self.v) <= MAX_SAMPLES:
                raise ValueError("t and v must have equal, non-zero length")
            return self

    class RawBatch(BaseModel):
        model_config = strict
        device: Id
        window: Window
        sensors: Annotated[dict[Id, Series], Field(min_length=1)]

        @model_validator(mode="after")
        def _inside(self) -> "RawBatch":
            lo, hi = self.window.start, self.window.start + self.window.size
            for series in self.sensors.values():
                if min(series.t) < lo or max(series.t) >= hi:
                    raise ValueError("timestamps outside the window")
            return self

    class Inner(BaseModel):
        model_config = strict
        topic: str
        src: str
        boot: str
        seq: int
        ts: int
        data: RawBatch

    return (lambda plain: RawBatch.model_validate(orjson.loads(plain)["data"])), Inner.model_validate_json


def msgspec_candidate():  # type: ignore[no-untyped-def]
    import msgspec
    from msgspec import Meta, Struct

    Id = Annotated[str, Meta(pattern=ID)]

    class Window(Struct, forbid_unknown_fields=True, frozen=True):
        start: Annotated[int, Meta(ge=0)]
        size: Annotated[int, Meta(gt=0)]

    class Series(Struct, forbid_unknown_fields=True, frozen=True):
        unit: Annotated[str, Meta(max_length=32)]
        t: list[int]
        v: list[float]

        def __post_init__(self) -> None:
            if len(self.t) != len(self.v) or not 0 < len(self.v) <= MAX_SAMPLES:
                raise ValueError("t and v must have equal, non-zero length")

    class RawBatch(Struct, forbid_unknown_fields=True, frozen=True):
        device: Id
        window: Window
        sensors: Annotated[dict[Id, Series], Meta(min_length=1)]

        def __post_init__(self) -> None:
            lo, hi = self.window.start, self.window.start + self.window.size
            for series in self.sensors.values():
                if min(series.t) < lo or max(series.t) >= hi:
                    raise ValueError("timestamps outside the window")

    class Inner(Struct, forbid_unknown_fields=True, frozen=True):
        topic: str
        src: str
        boot: str
        seq: int
        ts: int
        data: RawBatch

    decoder = msgspec.json.Decoder(Inner)
    return (lambda plain: msgspec.convert(orjson.loads(plain)["data"], RawBatch)), decoder.decode


def orjson_only(plain: bytes) -> object:
    """The floor: parsing alone, no validation (what the bus did before the handler's own checks)."""
    value = orjson.loads(plain)
    assert all(math.isfinite(x) for s in value["data"]["sensors"].values() for x in s["v"])
    return value


def per_message_us(fn, payload: bytes, seconds: float = 1.0) -> float:  # type: ignore[no-untyped-def]
    fn(payload)
    runs = []
    for _ in range(5):
        n, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / 5:
            for _ in range(20):
                fn(payload)
            n += 20
        runs.append(elapsed / n * 1e6)
    return statistics.median(runs)


def main() -> None:
    candidates = {"orjson only (no validation)": (orjson_only, None)}
    for name, factory in (("pydantic", pydantic_candidate), ("msgspec", msgspec_candidate)):
        from_dict, from_bytes = factory()
        candidates[f"{name} from dict"] = (from_dict, None)
        candidates[f"{name} from bytes"] = (from_bytes, None)
    sizes = {
        "4 readings (4x1)": make_inner(4, 1),
        "100 readings (10x10)": make_inner(10, 10),
        "1,000 readings (10x100)": make_inner(10, 100),
    }
    print(f"python {sys.version.split()[0]}; µs per message (median of 5), decode + validate")
    print(f"{'candidate':32}" + "".join(f"{s:>25}" for s in sizes))
    for name, (fn, _) in candidates.items():
        print(f"{name:32}" + "".join(f"{per_message_us(fn, p):>25.1f}" for p in sizes.values()))


if __name__ == "__main__":
    main()
