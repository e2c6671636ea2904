"""A stand-in for the Matrix Authentication Service (MAS), speaking the parts
of its real protocol that a compatibility login uses.

    mas_standin.py PORT SYNAPSE_URL SECRET SERVER_NAME

- `GET|POST /_matrix/client/{version}/login`: the login flows, and an
  `m.login.password` login (password "mas-password"). As MAS does, it first
  provisions the user and the device in Synapse through Synapse's
  `/_synapse/mas/provision_user` and `/upsert_device` (shared-secret bearer),
  then issues an opaque access token (`mat_...`).
- `POST /_matrix/client/{version}/logout`: forgets the token and deletes the
  session's device in Synapse (`/_synapse/mas/delete_device`).
- `POST /oauth2/introspect`: RFC 7662 token introspection as Synapse calls it
  (bearer = the shared secret, form `token=...`), with MAS's Matrix scopes.
- `GET /.well-known/openid-configuration`: the issuer metadata Synapse
  relays as `auth_metadata`.
- `GET /health`.

Prints "ready", then one line per request it receives: "METHOD PATH".
"""
import json
import secrets
import sys
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, SYNAPSE, SECRET = int(sys.argv[1]), sys.argv[2].rstrip("/"), sys.argv[3]
ISSUER = f"http://127.0.0.1:{PORT}/"
TOKENS = {}


def synapse_mas_api(endpoint, body):
    request = urllib.request.Request(
        f"{SYNAPSE}/_synapse/mas/{endpoint}", data=json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def do_GET(self):
        print(f"GET {self.path}", flush=True)
        path = urllib.parse.urlsplit(self.path).path
        if path == "/health":
            self.reply(200, {})
        elif path == "/.well-known/openid-configuration":
            self.reply(200, {"issuer": ISSUER, "authorization_endpoint": ISSUER + "authorize",
                             "token_endpoint": ISSUER + "oauth2/token", "jwks_uri": ISSUER + "oauth2/keys.json",
                             "response_types_supported": ["code"], "grant_types_supported": ["authorization_code"],
                             "account_management_uri": ISSUER + "account/"})
        elif path.endswith("/login"):
            self.reply(200, {"flows": [{"type": "m.login.password"}]})
        else:
            self.reply(404, {"errcode": "M_NOT_FOUND", "error": "stand-in"})

    def do_POST(self):
        print(f"POST {self.path}", flush=True)
        path = urllib.parse.urlsplit(self.path).path
        raw = self.body()
        if path.endswith("/login"):
            login = json.loads(raw or b"{}")
            user = (login.get("identifier") or {}).get("user") or login.get("user")
            if login.get("type") != "m.login.password" or not user or login.get("password") != "mas-password":
                return self.reply(403, {"errcode": "M_FORBIDDEN", "error": "Invalid username or password"})
            localpart = user.split(":")[0].lstrip("@")
            device = "MAS" + secrets.token_hex(4).upper()
            synapse_mas_api("provision_user", {"localpart": localpart, "set_displayname": localpart})
            synapse_mas_api("upsert_device", {"localpart": localpart, "device_id": device})
            token = "mat_" + secrets.token_urlsafe(24)
            TOKENS[token] = (localpart, device)
            server_name = SYNAPSE_SERVER_NAME
            return self.reply(200, {"user_id": f"@{localpart}:{server_name}", "access_token": token,
                                    "device_id": device, "home_server": server_name})
        if path.endswith("/logout"):
            token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
            session = TOKENS.pop(token, None)
            if session:
                # As MAS does: the session's device goes, so Synapse drops its cached introspection.
                synapse_mas_api("delete_device", {"localpart": session[0], "device_id": session[1]})
            return self.reply(200, {})
        if path == "/oauth2/introspect":
            if self.headers.get("Authorization") != f"Bearer {SECRET}":
                return self.reply(401, {"error": "invalid_client"})
            token = urllib.parse.parse_qs(raw.decode()).get("token", [""])[0]
            if token not in TOKENS:
                return self.reply(200, {"active": False})
            localpart, device = TOKENS[token]
            return self.reply(200, {"active": True, "username": localpart, "sub": "01STANDIN" + localpart,
                                    "device_id": device, "token_type": "access_token",
                                    "scope": f"urn:matrix:client:api:* urn:matrix:client:device:{device}"})
        self.reply(404, {"errcode": "M_NOT_FOUND", "error": "stand-in"})


SYNAPSE_SERVER_NAME = sys.argv[4] if len(sys.argv) > 4 else "example.com"

if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
    print("ready", flush=True)
    server.serve_forever()
