// Node-RED settings for the iotpipe flow (docs/consumers.md): everything else is Node-RED's default.
module.exports = {
    // The flow's credentials file (node-red-flow_cred.json) holds ${MQTT_USER} and ${MQTT_PASSWORD},
    // not the secrets themselves: read it as plain JSON, as it is shipped.
    credentialSecret: false,
    // The editor and HTTP nodes: http://127.0.0.1:<PORT>/ (1880 unless PORT is set).
    uiPort: Number(process.env.PORT || 1880),
    uiHost: "127.0.0.1",
    flowFilePretty: true,
    logging: { console: { level: "info", metrics: false, audit: false } },
};
