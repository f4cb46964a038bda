//! What the commands that talk to a running node (`pier status`, `pier warm`) share: the
//! default address, the check of `--url`, the credentials from the environment, the HTTP
//! client, the exit statuses, and how a failure to reach the node or an OCI error answer is
//! told in one line.

use std::process::ExitCode;
use std::time::Duration;

/// Where a node listens when `pier serve` runs with its defaults on this machine.
pub const DEFAULT_URL: &str = "http://127.0.0.1:5000";

/// The node answered and what was asked happened (or it is ready).
pub const EXIT_OK: u8 = 0;
/// The node answered, but what was asked did not (all) happen, or it is not ready.
pub const EXIT_NOT_DONE: u8 = 1;
/// The node could not be asked: unreachable, or its answer was not what pier speaks.
pub const EXIT_UNREACHABLE: u8 = 2;

/// The largest answer body read into memory; status documents and error bodies are far
/// smaller, so anything beyond this is not from a pier node.
pub const MAX_BODY: usize = 16 << 20;

/// The node's base URL from `--url`: `host:port` means plain HTTP, a trailing `/` is dropped,
/// and a path is kept (a node behind a proxy may live under one). Schemes other than http and
/// https are refused, since nothing could be asked there. So is a URL with credentials in it
/// (`http://user:pw@host`): every user of the machine reads them in the process list, so
/// they come from the environment instead ([`credentials`]), which is checked here too, so
/// that an unreadable password file fails every command before it asks anything.
pub fn base_url(given: &str) -> Result<String, String> {
    let trimmed = given.trim();
    let (scheme, rest) = match trimmed.split_once("://") {
        Some((scheme, rest)) => (scheme.to_ascii_lowercase(), rest),
        None => ("http".to_string(), trimmed),
    };
    if scheme != "http" && scheme != "https" {
        return Err(format!(
            "--url {given}: the scheme must be http:// or https:// (or none, for http)"
        ));
    }
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("--url {given}: expected [http[s]://]host[:port]"));
    }
    let authority = rest.split('/').next().unwrap_or(rest);
    if let Some((userinfo, host)) = authority.rsplit_once('@') {
        let user = userinfo.split(':').next().unwrap_or("");
        return Err(format!(
            "--url: credentials in the URL are refused, since the process list shows them to \
             every user of this machine; give {scheme}://{host}{} and the credentials as \
             PIER_USERNAME={user} with PIER_PASSWORD or PIER_PASSWORD_FILE in the environment",
            &rest[authority.len()..]
        ));
    }
    credentials()?;
    Ok(format!("{scheme}://{rest}"))
}

/// The user and password every request carries as Basic credentials, from the environment:
/// `PIER_USERNAME` with `PIER_PASSWORD`, or with `PIER_PASSWORD_FILE` (a file holding the
/// password; one trailing newline is not part of it), as `docker login --password-stdin`
/// style tools keep a password out of the process list. None when no user is given.
pub fn credentials() -> Result<Option<(String, String)>, String> {
    let Ok(user) = std::env::var("PIER_USERNAME") else {
        return Ok(None);
    };
    if let Ok(password) = std::env::var("PIER_PASSWORD") {
        return Ok(Some((user, password)));
    }
    let Some(file) = std::env::var_os("PIER_PASSWORD_FILE") else {
        return Err(
            "PIER_USERNAME is set but neither PIER_PASSWORD nor PIER_PASSWORD_FILE is".to_string(),
        );
    };
    let text = std::fs::read_to_string(&file).map_err(|e| {
        format!(
            "PIER_PASSWORD_FILE {}: cannot read the password: {e}",
            std::path::Path::new(&file).display()
        )
    })?;
    let password = text
        .strip_suffix('\n')
        .map(|p| p.strip_suffix('\r').unwrap_or(p))
        .unwrap_or(&text);
    Ok(Some((user, password.to_string())))
}

/// The HTTP client for talking to a node. Connecting is bounded, so a wrong address fails in
/// seconds; reading is not, since a warm may wait minutes for one large placement. TCP
/// keepalive still notices a node whose host vanished mid-stream. With [`credentials`] in
/// the environment every request carries them as Basic credentials (a node with auth on
/// wants an admin user for `/api/v1/*`); [`base_url`] has already refused unreadable ones.
pub fn client() -> Result<reqwest::Client, reqwest::Error> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Ok(Some((user, password))) = credentials() {
        use base64::Engine as _;
        let v = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        if let Ok(mut v) = reqwest::header::HeaderValue::from_str(&format!("Basic {v}")) {
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
    }
    reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(Duration::from_secs(10))
        .tcp_keepalive(Duration::from_secs(30))
        .user_agent(concat!("pier/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// A single-threaded runtime: these commands do one request at a time.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// The part of a transport failure a person can act on ("Connection refused (os error 111)",
/// "failed to lookup address information: …"): the innermost cause, since the outer layers
/// only repeat the URL or say "client error".
pub fn cause(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".to_string();
    }
    let mut innermost: &dyn std::error::Error = e;
    while let Some(next) = innermost.source() {
        innermost = next;
    }
    innermost.to_string()
}

/// Say on stderr that `url` could not be asked, and give the exit status for it.
pub fn unreachable(url: &str, cause: &str) -> ExitCode {
    eprintln!("pier: cannot reach {url}: {cause}");
    ExitCode::from(EXIT_UNREACHABLE)
}

/// The messages of an OCI error body (`{"errors":[{"code","message"}]}`), joined by "; ";
/// the code stands in for an empty message. None when the body is not one.
pub fn oci_error_message(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let messages: Vec<String> = value
        .get("errors")?
        .as_array()?
        .iter()
        .filter_map(|e| {
            let message = e.get("message").and_then(|m| m.as_str()).unwrap_or("");
            let code = e.get("code").and_then(|c| c.as_str()).unwrap_or("");
            match (message, code) {
                ("", "") => None,
                ("", code) => Some(code.to_string()),
                (message, _) => Some(message.to_string()),
            }
        })
        .collect();
    (!messages.is_empty()).then(|| messages.join("; "))
}

/// Read a whole answer body, refusing one larger than [`MAX_BODY`].
pub async fn read_body(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| cause(&e))? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(format!("the answer is larger than {} MiB", MAX_BODY >> 20));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::{base_url, oci_error_message};

    #[test]
    fn a_url_without_a_scheme_is_plain_http_and_other_schemes_are_refused() {
        assert_eq!(
            base_url("pier.lan:5000").as_deref(),
            Ok("http://pier.lan:5000")
        );
        assert_eq!(
            base_url("HTTPS://pier.lan/").as_deref(),
            Ok("https://pier.lan")
        );
        assert_eq!(
            base_url("http://proxy.lan/pier/").as_deref(),
            Ok("http://proxy.lan/pier")
        );
        let refused = base_url("ftp://pier.lan").expect_err("ftp is refused");
        assert!(refused.contains("http:// or https://"), "{refused}");
        assert!(base_url("http://").is_err());
    }

    #[test]
    fn oci_error_bodies_give_their_messages_and_other_bodies_none() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown: a:v1"},
            {"code":"DENIED","message":""}]}"#;
        assert_eq!(
            oci_error_message(body).as_deref(),
            Some("manifest unknown: a:v1; DENIED")
        );
        assert_eq!(oci_error_message(b"<html>bad gateway</html>"), None);
        assert_eq!(oci_error_message(br#"{"errors":[]}"#), None);
    }
}
