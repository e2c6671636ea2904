//! A Matrix client for end-to-end tests against a real Synapse through the edge.

use serde_json::Value;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const HOST: &str = "synapse.example.com";
/// The client connects from this loopback address, which is not the
/// edge's own, so only a correct X-Forwarded-For can tell Synapse about it.
pub const CLIENT_IP: &str = "127.0.0.2";
pub const FORGED_IP: &str = "203.0.113.9";

pub fn synapse_python() -> PathBuf {
    if let Ok(python) = std::env::var("MATRIX_EDGE_SYNAPSE_PYTHON") {
        return PathBuf::from(python);
    }
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join(".dev/venv/bin/python");
    assert!(
        default.exists(),
        "Synapse is not installed: run scripts/test (it installs matrix-synapse into .dev/venv) or set MATRIX_EDGE_SYNAPSE_PYTHON"
    );
    default
}

pub struct Client {
    pub http: reqwest::Client,
    pub base: String,
    pub token: Option<String>,
}

impl Client {
    pub fn new(edge: SocketAddr, root_pem: &str, h1_only: bool) -> Client {
        let mut builder = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(root_pem.as_bytes()).unwrap())
            .resolve(HOST, edge)
            .local_address(CLIENT_IP.parse::<std::net::IpAddr>().unwrap())
            .timeout(Duration::from_secs(120));
        if h1_only {
            builder = builder.http1_only();
        }
        Client { http: builder.build().unwrap(), base: format!("https://{HOST}:{}", edge.port()), token: None }
    }

    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut request =
            self.http.request(method, format!("{}{path}", self.base)).header("X-Forwarded-For", FORGED_IP);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        request
    }

    pub async fn json(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = self.request(method, path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON from {path}: {text}")))
    }
}

pub fn encode(id: &str) -> String {
    id.replace('!', "%21").replace(':', "%3A").replace('@', "%40").replace('$', "%24")
}

impl Client {
    /// Registers `user` (dummy auth, as the dev config allows), logs in with
    /// its password, keeps the access token and returns it.
    pub async fn register_and_login(&mut self, user: &str, password: &str) -> String {
        let register = serde_json::json!({"username": user, "password": password, "auth": {"type": "m.login.dummy"}});
        let (status, registered) =
            self.json(reqwest::Method::POST, "/_matrix/client/v3/register", Some(register)).await;
        assert_eq!(status, 200, "{registered}");
        assert_eq!(registered["user_id"], format!("@{user}:example.com"));
        let login = serde_json::json!({"type": "m.login.password", "identifier": {"type": "m.id.user", "user": user}, "password": password});
        let (status, body) = self.json(reqwest::Method::POST, "/_matrix/client/v3/login", Some(login)).await;
        assert_eq!(status, 200, "{body}");
        let token = body["access_token"].as_str().unwrap().to_string();
        self.token = Some(token.clone());
        token
    }
}
