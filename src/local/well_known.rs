//! `/.well-known/matrix/{server,client,support}`, answered by the edge.
//!
//! Documents are checked against the Matrix spec when the config loads and
//! rendered to bytes once; a request only picks one.

use crate::config::ConfigError;
use crate::config::{ClientWellKnownConfig, Seg, Source, SupportWellKnownConfig, WellKnownConfig};
pub use crate::request::admission::Document;
use crate::request::errors::MatrixError;
use crate::request::response::LocalResponse;
use bytes::Bytes;
use http::Method;
use serde_json::{json, Map, Value};

/// The rendered documents; `None` means not configured (answered 404).
#[derive(Debug, Clone)]
pub struct WellKnown {
    server: Option<Bytes>,
    client: Option<Bytes>,
    support: Option<Bytes>,
    cache_control: String,
}

impl WellKnown {
    pub fn from_config(config: &WellKnownConfig, source: &Source) -> Result<WellKnown, ConfigError> {
        let server = config.server.as_ref().map(|address| render(&json!({ "m.server": address.to_string() })));
        let client = config.client.as_ref().map(|client| client_document(client, source)).transpose()?;
        let support = config.support.as_ref().map(|support| support_document(support, source)).transpose()?;
        Ok(WellKnown {
            server,
            client,
            support,
            cache_control: format!("public, max-age={}", config.max_age.0.as_secs()),
        })
    }

    pub fn configured(&self) -> Vec<&'static str> {
        [(Document::Server, &self.server), (Document::Client, &self.client), (Document::Support, &self.support)]
            .into_iter()
            .filter(|(_, body)| body.is_some())
            .map(|(doc, _)| doc.name())
            .collect()
    }

    pub fn respond(&self, document: Document, method: &Method) -> LocalResponse {
        if method == Method::OPTIONS {
            return LocalResponse::empty(204).with_cors().with_header("Access-Control-Max-Age", "86400".into());
        }
        if method != Method::GET && method != Method::HEAD {
            return MatrixError::method_not_allowed().to_response().with_header("Allow", "GET, HEAD, OPTIONS".into());
        }
        let body = match document {
            Document::Server => &self.server,
            Document::Client => &self.client,
            Document::Support => &self.support,
        };
        match body {
            Some(body) => LocalResponse::json(200, body.clone())
                .with_cors()
                .with_header("Cache-Control", self.cache_control.clone()),
            None => MatrixError::not_found(format!("No {} discovery document is published here", document.name()))
                .to_response()
                // Clients cache a "no discovery" answer too; let them re-check sooner.
                .with_header("Cache-Control", "public, max-age=300".into()),
        }
    }
}

fn render(value: &Value) -> Bytes {
    Bytes::from(value.to_string())
}

/// Namespaced like a Java package (`io.element.e2ee`), as the spec requires for extra keys.
fn is_namespaced(key: &str) -> bool {
    let parts: Vec<&str> = key.split('.').collect();
    parts.len() >= 2
        && parts.iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
}

/// The well-known key MatrixRTC clients read (MSC4143).
const RTC_FOCI: &str = "org.matrix.msc4143.rtc_foci";

/// The foci as published: each `{"type": ..., fields...}`, checked first.
/// A LiveKit focus needs an https `livekit_service_url` (lk-jwt-service's
/// address): Element Call fails silently on anything else.
fn rtc_foci(config: &ClientWellKnownConfig, source: &Source) -> Result<Value, ConfigError> {
    let mut foci = Vec::with_capacity(config.rtc_foci.len());
    for (index, focus) in config.rtc_foci.iter().enumerate() {
        let at =
            |key| [Seg::Key("well_known"), Seg::Key("client"), Seg::Key("rtc_foci"), Seg::Index(index), Seg::Key(key)];
        if focus.kind.is_empty() {
            return Err(source.error_at(&at("type"), "a focus needs a type, such as livekit"));
        }
        if focus.kind == "livekit" {
            let url = focus.fields.get("livekit_service_url").and_then(Value::as_str);
            let valid = url.and_then(|u| u.strip_prefix("https://")).is_some_and(|rest| {
                let host = rest.split(['/', '?', '#']).next().unwrap_or("");
                !host.is_empty() && !rest.chars().any(char::is_whitespace)
            });
            if !valid {
                return Err(source.error_at(
                    &at("type"),
                    "a livekit focus needs livekit_service_url, the https:// URL of lk-jwt-service (for example https://rtc.example.com)",
                ));
            }
        }
        let mut entry = Map::new();
        entry.insert("type".into(), Value::String(focus.kind.clone()));
        for (key, value) in &focus.fields {
            entry.insert(key.clone(), value.clone());
        }
        foci.push(Value::Object(entry));
    }
    Ok(Value::Array(foci))
}

fn client_document(config: &ClientWellKnownConfig, source: &Source) -> Result<Bytes, ConfigError> {
    let mut document = Map::new();
    document.insert("m.homeserver".into(), json!({ "base_url": config.homeserver.0 }));
    if let Some(identity) = &config.identity_server {
        document.insert("m.identity_server".into(), json!({ "base_url": identity.0 }));
    }
    if !config.rtc_foci.is_empty() {
        document.insert(RTC_FOCI.into(), rtc_foci(config, source)?);
    }
    for (key, value) in &config.extra {
        let path = [Seg::Key("well_known"), Seg::Key("client"), Seg::Key("extra")];
        if key == RTC_FOCI && !config.rtc_foci.is_empty() {
            return Err(source.error_at(&path, format!("{RTC_FOCI} is set by `rtc_foci`; keep one of them")));
        }
        if key == "m.homeserver" || key == "m.identity_server" {
            return Err(
                source.error_at(&path, format!("{key:?} is set by `homeserver`/`identity_server`, not in `extra`"))
            );
        }
        if !is_namespaced(key) {
            return Err(source.error_at(
                &path,
                format!("key {key:?} is not namespaced: the spec wants Java-package style names such as \"io.element.e2ee\""),
            ));
        }
        document.insert(key.clone(), value.clone());
    }
    Ok(render(&Value::Object(document)))
}

fn support_document(config: &SupportWellKnownConfig, source: &Source) -> Result<Bytes, ConfigError> {
    let base = [Seg::Key("well_known"), Seg::Key("support")];
    if config.contacts.is_empty() && config.support_page.is_none() {
        return Err(source.error_at(&base, "needs at least one of `contacts` or `support_page`"));
    }
    for (index, contact) in config.contacts.iter().enumerate() {
        let path = [Seg::Key("well_known"), Seg::Key("support"), Seg::Key("contacts"), Seg::Index(index)];
        if contact.matrix_id.is_none() && contact.email_address.is_none() {
            return Err(source.error_at(&path, "a contact needs `matrix_id` or `email_address`"));
        }
        if let Some(id) = &contact.matrix_id {
            if !is_user_id(id) {
                return Err(
                    source.error_at(&path, format!("{id:?} is not a Matrix user ID such as \"@admin:example.com\""))
                );
            }
        }
        if let Some(email) = &contact.email_address {
            if !email.contains('@') || email.chars().any(char::is_whitespace) {
                return Err(source.error_at(&path, format!("{email:?} is not an email address")));
            }
        }
        let role_ok = matches!(contact.role.as_str(), "m.role.admin" | "m.role.security")
            || (!contact.role.starts_with("m.") && is_namespaced(&contact.role));
        if !role_ok {
            return Err(source.error_at(
                &path,
                format!("role {:?} is not m.role.admin, m.role.security or a namespaced role", contact.role),
            ));
        }
    }
    let mut document = Map::new();
    if !config.contacts.is_empty() {
        document.insert("contacts".into(), serde_json::to_value(&config.contacts).unwrap_or(Value::Null));
    }
    if let Some(page) = &config.support_page {
        document.insert("support_page".into(), Value::String(page.0.clone()));
    }
    Ok(render(&Value::Object(document)))
}

fn is_user_id(id: &str) -> bool {
    let Some(rest) = id.strip_prefix('@') else {
        return false;
    };
    matches!(rest.split_once(':'), Some((local, server)) if !local.is_empty() && !server.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EdgeConfig;

    fn build(yaml: &str) -> Result<WellKnown, ConfigError> {
        let text = format!(
            "server_name: example.com\nlisteners: [{{address: \"127.0.0.1:1\", serves: [well_known]}}]\nsynapse: {{main: \"127.0.0.1:2\"}}\nwell_known:\n{yaml}"
        );
        let source = Source { file: "t.yaml".into(), text };
        let config: EdgeConfig = source.parse()?;
        WellKnown::from_config(&config.well_known, &source)
    }

    fn body(response: &LocalResponse) -> Value {
        serde_json::from_slice(&response.body).unwrap()
    }

    #[test]
    fn server_document_and_caching() {
        let wk = build("  server: synapse.example.com:443\n  max_age: 2h\n").unwrap();
        let response = wk.respond(Document::Server, &Method::GET);
        assert_eq!(response.status, 200);
        assert_eq!(body(&response), json!({"m.server": "synapse.example.com:443"}));
        assert!(response.headers.contains(&("Cache-Control", "public, max-age=7200".into())));
        assert!(response.headers.contains(&("Content-Type", "application/json".into())));
    }

    #[test]
    fn client_document_merges_extra_keys() {
        let wk = build("  client:\n    homeserver: https://matrix.example.com\n    identity_server: https://vector.im\n    extra:\n      io.element.e2ee: {default: false}\n").unwrap();
        assert_eq!(
            body(&wk.respond(Document::Client, &Method::GET)),
            json!({"m.homeserver": {"base_url": "https://matrix.example.com"},
                   "m.identity_server": {"base_url": "https://vector.im"},
                   "io.element.e2ee": {"default": false}})
        );
    }

    #[test]
    fn unnamespaced_extra_key_is_located() {
        let err =
            build("  client:\n    homeserver: https://matrix.example.com\n    extra:\n      jitsi: {}\n").unwrap_err();
        assert!(err.message.contains("\"jitsi\" is not namespaced"), "{err}");
        assert_eq!(err.line, Some(7));
    }

    #[test]
    fn support_contacts_are_checked() {
        assert!(build("  support: {}\n").unwrap_err().message.contains("at least one"));
        let err = build("  support:\n    contacts:\n      - {role: m.role.admin}\n").unwrap_err();
        assert!(err.message.contains("matrix_id"), "{err}");
        assert_eq!(err.line, Some(7));
        let err = build("  support:\n    contacts:\n      - {matrix_id: \"@a:example.com\", role: m.role.boss}\n")
            .unwrap_err();
        assert!(err.message.contains("m.role.boss"), "{err}");
        let ok = build("  support:\n    contacts:\n      - {email_address: a@example.com, role: m.role.security}\n    support_page: https://example.com/help\n").unwrap();
        assert_eq!(
            body(&ok.respond(Document::Support, &Method::GET)),
            json!({"contacts": [{"email_address": "a@example.com", "role": "m.role.security"}], "support_page": "https://example.com/help"})
        );
    }

    #[test]
    fn absent_document_is_404_json_with_cors() {
        let wk = build("  max_age: 1h\n").unwrap();
        let response = wk.respond(Document::Client, &Method::GET);
        assert_eq!(response.status, 404);
        assert_eq!(body(&response)["errcode"], "M_NOT_FOUND");
        assert!(response.headers.contains(&("Access-Control-Allow-Origin", "*".into())));
    }

    #[test]
    fn preflight_and_wrong_method() {
        let wk = build("  server: a.example.com\n").unwrap();
        let preflight = wk.respond(Document::Client, &Method::OPTIONS);
        assert_eq!(preflight.status, 204);
        assert!(preflight.body.is_empty());
        assert!(preflight
            .headers
            .contains(&("Access-Control-Allow-Methods", "GET, POST, PUT, DELETE, OPTIONS".into())));
        assert_eq!(wk.respond(Document::Server, &Method::POST).status, 405);
    }

    #[test]
    fn paths_match_exactly() {
        assert_eq!(Document::from_path(b"/.well-known/matrix/server"), Some(Document::Server));
        assert_eq!(Document::from_path(b"/.well-known/matrix/server/"), None);
        assert_eq!(Document::from_path(b"/.well-known/matrix/"), None);
    }

    #[test]
    fn rtc_foci_are_published_and_checked() {
        let wk = build("  client:\n    homeserver: https://matrix.example.com\n    rtc_foci:\n      - { type: livekit, livekit_service_url: \"https://rtc.example.com\" }\n").unwrap();
        let response = wk.respond(Document::Client, &http::Method::GET);
        assert_eq!(
            body(&response)["org.matrix.msc4143.rtc_foci"],
            json!([{"type": "livekit", "livekit_service_url": "https://rtc.example.com"}])
        );
        for bad in [
            "      - { type: livekit, livekit_service_url: \"http://rtc.example.com\" }\n",
            "      - { type: livekit }\n",
            "      - { type: livekit, livekit_service_url: \"https://\" }\n",
            "      - { type: \"\" }\n",
        ] {
            let err = build(&format!("  client:\n    homeserver: https://matrix.example.com\n    rtc_foci:\n{bad}"))
                .unwrap_err();
            assert!(err.key.as_deref().is_some_and(|k| k.starts_with("well_known.client.rtc_foci[0]")), "{bad}: {err}");
            assert_eq!(err.line, Some(8), "{bad}: {err}");
        }
        let both = build("  client:\n    homeserver: https://matrix.example.com\n    rtc_foci: [{ type: livekit, livekit_service_url: \"https://rtc.example.com\" }]\n    extra: { org.matrix.msc4143.rtc_foci: [] }\n").unwrap_err();
        assert!(both.message.contains("keep one of them"), "{both}");
    }
}
