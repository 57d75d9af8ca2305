/*
 * iotpipe_guard: the pipeline broker's identity rules that mosquitto's password and ACL files cannot
 * express (docs/security.md, "The pipeline broker"). Loaded with `plugin <path>/iotpipe_guard.so`
 * next to password_file and acl_file, which still decide everything else: every check here either
 * refuses or defers to them, it never grants.
 *
 *  1. A client's id must be `<username>-<suffix>`, suffix [A-Za-z0-9_-]{1,64}: a user can take over
 *     (and so end, or inherit the durable session of) only a client of its own user. Without it any
 *     user may connect under another service's client id: the broker closes the real service's
 *     connection and hands its session, and the messages queued in it, to the newcomer.
 *  2. A shared subscription's group must be the user's name or start with `<username>-`: no user
 *     can join another service's group and take its share of the messages (they are acknowledged to
 *     the broker by the thief and gone). mosquitto checks a `$share/<group>/<filter>` subscription
 *     against the ACL by its filter alone, so `read` access to a topic admitted joining any group.
 *  3. Every level of a published topic matches [A-Za-z0-9_-]{1,64} (the contract's ids) and there
 *     are at most 8 levels: ids the contract forbids (spaces, `:`, 300 characters, non-ASCII) are
 *     refused by the broker, not first decrypted by a consumer. Retained-message clears (empty
 *     payload) obey the same rule.
 *  4. On a listener that requires a client certificate and a password (the services' mTLS option),
 *     the certificate's common name must be the username: a certificate is a second factor for
 *     its own user only.
 *
 * A listener with `use_identity_as_username` (the bridge's) never reaches rule 1 (mosquitto does
 * not run password checks there); it must set `use_username_as_clientid` instead, so the client id
 * is the certificate's name and cannot be another client's.
 *
 * Built on demand for the local stack, the tests and the bench (iotpipe.devstack.build_broker_plugin:
 * cc -shared -fPIC, mosquitto-dev's and OpenSSL's headers, -lcrypto; `make deps` installs them), and
 * in the compose broker image (mosquitto/Dockerfile).
 */
#include <stdbool.h>
#include <stddef.h>
#include <string.h>

#include <mosquitto.h>
#include <mosquitto_broker.h>
#include <mosquitto_plugin.h>
#include <openssl/objects.h>
#include <openssl/x509.h>

#define ID_MAX 64
#define TOPIC_LEVELS_MAX 8

static mosquitto_plugin_id_t *plugin_id = NULL;

static bool id_char(char c)
{
	return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-';
}

/* [A-Za-z0-9_-]{1,ID_MAX} over exactly `len` bytes. */
static bool valid_id(const char *s, size_t len)
{
	if(len == 0 || len > ID_MAX){
		return false;
	}
	for(size_t i = 0; i < len; i++){
		if(!id_char(s[i])){
			return false;
		}
	}
	return true;
}

/* `s` is `<prefix>` or `<prefix>-...` (allow_exact) / only `<prefix>-<valid id>` (otherwise). */
static bool owned_by(const char *s, size_t len, const char *user, bool allow_exact)
{
	size_t n = strlen(user);
	if(len < n || strncmp(s, user, n) != 0){
		return false;
	}
	if(len == n){
		return allow_exact;
	}
	return s[n] == '-' && valid_id(s + n + 1, len - n - 1);
}

static int on_basic_auth(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)userdata;
	struct mosquitto_evt_basic_auth *ed = event_data;
	const char *client_id = mosquitto_client_id(ed->client);
	if(ed->username == NULL || client_id == NULL){
		return MOSQ_ERR_AUTH;
	}
	X509 *cert = mosquitto_client_certificate(ed->client);
	if(cert != NULL){
		char common_name[256] = "";
		X509_NAME_get_text_by_NID(X509_get_subject_name(cert), NID_commonName, common_name, sizeof(common_name));
		X509_free(cert);
		if(strcmp(common_name, ed->username) != 0){
			mosquitto_log_printf(MOSQ_LOG_NOTICE,
					"iotpipe_guard: refused user %.64s: its client certificate names %.64s", ed->username,
					common_name);
			return MOSQ_ERR_AUTH;
		}
	}
	if(!owned_by(client_id, strlen(client_id), ed->username, false)){
		/* The id is the client's own choice, not a secret; lengths are capped in the log line. */
		mosquitto_log_printf(MOSQ_LOG_NOTICE,
				"iotpipe_guard: refused user %.64s: client id %.80s is not <user>-<id>",
				ed->username, client_id);
		return MOSQ_ERR_AUTH;
	}
	return MOSQ_ERR_PLUGIN_DEFER;
}

static bool valid_topic(const char *topic)
{
	int levels = 0;
	const char *start = topic;
	for(const char *p = topic;; p++){
		if(*p == '/' || *p == '\0'){
			if(!valid_id(start, (size_t)(p - start)) || ++levels > TOPIC_LEVELS_MAX){
				return false;
			}
			if(*p == '\0'){
				return true;
			}
			start = p + 1;
		}
	}
}

static int on_acl_check(int event, void *event_data, void *userdata)
{
	(void)event;
	(void)userdata;
	struct mosquitto_evt_acl_check *ed = event_data;
	const char *username = mosquitto_client_username(ed->client);
	if(username == NULL || ed->topic == NULL){
		return MOSQ_ERR_ACL_DENIED;
	}
	if(ed->access == MOSQ_ACL_WRITE && !valid_topic(ed->topic)){
		mosquitto_log_printf(MOSQ_LOG_NOTICE, "iotpipe_guard: refused a publish by %.64s: topic levels must be ids",
				username);
		return MOSQ_ERR_ACL_DENIED;
	}
	if(ed->access == MOSQ_ACL_SUBSCRIBE && strncmp(ed->topic, "$share/", 7) == 0){
		const char *group = ed->topic + 7;
		const char *end = strchr(group, '/');
		if(end == NULL || !owned_by(group, (size_t)(end - group), username, true)){
			mosquitto_log_printf(MOSQ_LOG_NOTICE,
					"iotpipe_guard: refused a shared subscription by %.64s: the group must be its own", username);
			return MOSQ_ERR_ACL_DENIED;
		}
	}
	return MOSQ_ERR_PLUGIN_DEFER;
}

int mosquitto_plugin_version(int supported_version_count, const int *supported_versions)
{
	for(int i = 0; i < supported_version_count; i++){
		if(supported_versions[i] == 5){
			return 5;
		}
	}
	return -1;
}

int mosquitto_plugin_init(mosquitto_plugin_id_t *identifier, void **userdata, struct mosquitto_opt *options,
		int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	plugin_id = identifier;
	int rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL, NULL);
	if(rc == MOSQ_ERR_SUCCESS){
		rc = mosquitto_callback_register(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL, NULL);
	}
	return rc;
}

int mosquitto_plugin_cleanup(void *userdata, struct mosquitto_opt *options, int option_count)
{
	(void)userdata;
	(void)options;
	(void)option_count;
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_BASIC_AUTH, on_basic_auth, NULL);
	mosquitto_callback_unregister(plugin_id, MOSQ_EVT_ACL_CHECK, on_acl_check, NULL);
	return MOSQ_ERR_SUCCESS;
}
