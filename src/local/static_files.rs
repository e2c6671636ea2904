//! Static files (Element Web and the like): what to send for a path, decided
//! without a socket. The glue streams the chosen byte range from disk.
//!
//! Nothing outside the root is ever served: encoded slashes, backslashes and
//! NUL are refused, `..` segments are refused, and the final file's
//! canonical path (symlinks resolved) must lie under the root's.

use crate::config::sites::StaticConfig;
use crate::request::admission::percent_decode;
use crate::request::errors::MatrixError;
use http::HeaderMap;
use regex::Regex;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub struct StaticRoot {
    /// Canonical, so a file's canonical path can be compared with it.
    root: PathBuf,
    index: String,
    fallback: Option<String>,
    precompressed: bool,
    cache: Vec<(Regex, String)>,
}

/// A file to send: the head, and which bytes of which file follow it.
#[derive(Debug, PartialEq, Eq)]
pub struct FileAnswer {
    /// 200, 206 or 304.
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub file: PathBuf,
    /// First byte to send.
    pub offset: u64,
    /// Bytes to send (0 for 304).
    pub length: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum StaticAnswer {
    File(FileAnswer),
    /// A directory asked for without its trailing slash: here it is with one.
    AddSlash(String),
    Refuse(MatrixError),
}

impl StaticRoot {
    /// The root, or the key at fault and why.
    pub fn from_config(config: &StaticConfig, base: &Path) -> Result<StaticRoot, (&'static str, String)> {
        let root = base.join(&config.root);
        let root =
            root.canonicalize().map_err(|e| ("root", format!("cannot open static root {}: {e}", root.display())))?;
        if !root.is_dir() {
            return Err(("root", format!("static root {} is not a directory", root.display())));
        }
        if config.index.is_empty() || config.index.contains('/') {
            return Err(("index", format!("index {:?} must be a file name", config.index)));
        }
        let mut cache = Vec::with_capacity(config.cache.len());
        for rule in &config.cache {
            let pattern = Regex::new(&rule.pattern)
                .map_err(|e| ("cache", format!("cache pattern {:?} is not valid: {e}", rule.pattern)))?;
            if http::HeaderValue::from_str(&rule.cache_control).is_err() {
                return Err(("cache", format!("cache_control {:?} is not a valid header value", rule.cache_control)));
            }
            cache.push((pattern, rule.cache_control.clone()));
        }
        let fallback = config.fallback.as_ref().map(|f| f.trim_start_matches('/').to_string());
        if let Some(fallback) = &fallback {
            let file = root.join(fallback);
            if !file.is_file() || fallback.split('/').any(|s| s == "..") {
                return Err(("fallback", format!("fallback {} is not a file under the root", file.display())));
            }
        }
        Ok(StaticRoot { root, index: config.index.clone(), fallback, precompressed: config.precompressed, cache })
    }

    /// What to answer for `path` (below the route, raw, no query).
    pub fn resolve(&self, method: &http::Method, path: &[u8], headers: &HeaderMap) -> StaticAnswer {
        if method != http::Method::GET && method != http::Method::HEAD {
            return StaticAnswer::Refuse(MatrixError::method_not_allowed());
        }
        let segments = match safe_segments(path) {
            Ok(segments) => segments,
            Err(reason) => return StaticAnswer::Refuse(MatrixError::bad_request(reason)),
        };
        let mut relative: String = segments.join("/");
        let mut file = self.root.join(&relative);
        match std::fs::metadata(&file) {
            Ok(meta) if meta.is_dir() => {
                if !path.ends_with(b"/") {
                    let mut with_slash = String::from_utf8_lossy(path).into_owned();
                    with_slash.push('/');
                    return StaticAnswer::AddSlash(with_slash);
                }
                file.push(&self.index);
                relative = if relative.is_empty() { self.index.clone() } else { format!("{relative}/{}", self.index) };
            }
            _ => {}
        }
        let served = match self.inside_root(&file) {
            Some(found) => Some(found),
            None => self.fallback.as_ref().and_then(|fallback| {
                relative = fallback.clone();
                self.inside_root(&self.root.join(fallback))
            }),
        };
        let Some((file, meta)) = served else {
            return StaticAnswer::Refuse(MatrixError::not_found("No such file"));
        };
        StaticAnswer::File(self.answer(file, &meta, &relative, headers))
    }

    /// The canonical regular file at `file`, if it lies under the root.
    fn inside_root(&self, file: &Path) -> Option<(PathBuf, std::fs::Metadata)> {
        let canonical = file.canonicalize().ok()?;
        if !canonical.starts_with(&self.root) {
            return None;
        }
        let meta = std::fs::metadata(&canonical).ok()?;
        meta.is_file().then_some((canonical, meta))
    }

    fn answer(&self, file: PathBuf, meta: &std::fs::Metadata, relative: &str, request: &HeaderMap) -> FileAnswer {
        let modified = meta.modified().unwrap_or(UNIX_EPOCH);
        let content_type = content_type(&file);
        let mut headers: Vec<(&'static str, String)> = vec![("Content-Type", content_type)];
        let mut chosen = (file.clone(), meta.len(), None::<&'static str>);
        if self.precompressed {
            let mut any_variant = false;
            for (suffix, coding) in [("br", "br"), ("gz", "gzip")] {
                let mut variant = file.clone().into_os_string();
                variant.push(".");
                variant.push(suffix);
                let Some((variant, variant_meta)) = self.inside_root(Path::new(&variant)) else { continue };
                any_variant = true;
                if chosen.2.is_none() && accepts(request, coding) {
                    chosen = (variant, variant_meta.len(), Some(coding));
                }
            }
            if any_variant {
                headers.push(("Vary", "Accept-Encoding".into()));
            }
        }
        let (file, length, coding) = chosen;
        if let Some(coding) = coding {
            headers.push(("Content-Encoding", coding.into()));
        }
        let nanos = modified.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let etag = format!("\"{length:x}-{nanos:x}{}\"", coding.map_or(String::new(), |c| format!("-{c}")));
        headers.push(("ETag", etag.clone()));
        headers.push(("Last-Modified", httpdate::fmt_http_date(modified)));
        headers.push(("Accept-Ranges", "bytes".into()));
        headers.push(("X-Content-Type-Options", "nosniff".into()));
        let logical = format!("/{relative}");
        if let Some((_, value)) = self.cache.iter().find(|(pattern, _)| pattern.is_match(&logical)) {
            headers.push(("Cache-Control", value.clone()));
        }
        let not_modified = match request.get(http::header::IF_NONE_MATCH) {
            Some(tags) => etag_matches(tags.as_bytes(), &etag),
            None => request
                .get(http::header::IF_MODIFIED_SINCE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| httpdate::parse_http_date(v).ok())
                .is_some_and(|since| whole_seconds(modified) <= whole_seconds(since)),
        };
        if not_modified {
            headers.retain(|(name, _)| *name != "Content-Type" && *name != "Content-Encoding");
            return FileAnswer { status: 304, headers, file, offset: 0, length: 0 };
        }
        let range_applies = match request.get(http::header::IF_RANGE) {
            None => true,
            Some(value) => value.as_bytes() == etag.as_bytes(),
        };
        let range =
            request.get(http::header::RANGE).filter(|_| range_applies).map(|r| parse_range(r.as_bytes(), length));
        match range {
            Some(Some(RangeSpec::Satisfiable(first, last))) => {
                headers.push(("Content-Range", format!("bytes {first}-{last}/{length}")));
                FileAnswer { status: 206, headers, file, offset: first, length: last - first + 1 }
            }
            Some(Some(RangeSpec::Unsatisfiable)) => {
                headers.push(("Content-Range", format!("bytes */{length}")));
                FileAnswer { status: 416, headers, file, offset: 0, length: 0 }
            }
            // No Range, or one we do not serve (several ranges, bad syntax): the whole file.
            Some(None) | None => FileAnswer { status: 200, headers, file, offset: 0, length },
        }
    }
}

fn whole_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The decoded path segments, or why the path may not be served.
fn safe_segments(path: &[u8]) -> Result<Vec<String>, &'static str> {
    let lowered = path.to_ascii_lowercase();
    if lowered.windows(3).any(|w| w == b"%2f" || w == b"%5c" || w == b"%00") {
        return Err("Encoded slashes and NUL are not allowed in file paths");
    }
    let decoded = percent_decode(path).unwrap_or_else(|| path.to_vec());
    let text = String::from_utf8(decoded).map_err(|_| "File paths must be UTF-8")?;
    if text.contains('\\') || text.contains('\0') || !text.starts_with('/') {
        return Err("Not a file path");
    }
    let mut segments = Vec::new();
    for segment in text.split('/') {
        match segment {
            "" | "." => {}
            ".." => return Err("Paths may not leave the site's root"),
            other => segments.push(other.to_string()),
        }
    }
    Ok(segments)
}

fn content_type(file: &Path) -> String {
    let mime = mime_guess::from_path(file).first_or_octet_stream();
    let textual = mime.type_() == mime_guess::mime::TEXT
        || matches!(mime.subtype().as_str(), "javascript" | "json" | "xml" | "manifest+json");
    if textual {
        format!("{}; charset=utf-8", mime.essence_str())
    } else {
        mime.essence_str().to_string()
    }
}

/// Whether `Accept-Encoding` accepts `coding` (a `q=0` refuses it).
fn accepts(request: &HeaderMap, coding: &str) -> bool {
    request.get_all(http::header::ACCEPT_ENCODING).iter().filter_map(|v| v.to_str().ok()).any(|value| {
        value.split(',').any(|item| {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim();
            let refused = parts
                .any(|p| p.trim().strip_prefix("q=").is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0)));
            name.eq_ignore_ascii_case(coding) && !refused
        })
    })
}

/// `If-None-Match` against our (strong) tag, with weak comparison as RFC 9110 asks for GET.
fn etag_matches(header: &[u8], etag: &str) -> bool {
    let Ok(text) = std::str::from_utf8(header) else { return false };
    text.split(',').map(str::trim).any(|tag| tag == "*" || tag.trim_start_matches("W/") == etag)
}

#[derive(Debug, PartialEq, Eq)]
enum RangeSpec {
    /// First and last byte, inclusive.
    Satisfiable(u64, u64),
    Unsatisfiable,
}

/// One `bytes=` range; `None` for what we ignore (bad syntax, several ranges).
fn parse_range(header: &[u8], length: u64) -> Option<RangeSpec> {
    let text = std::str::from_utf8(header).ok()?.trim();
    let spec = text.strip_prefix("bytes=")?.trim();
    if spec.contains(',') {
        return None;
    }
    let (first, last) = spec.split_once('-')?;
    let (first, last) = (first.trim(), last.trim());
    let range = if first.is_empty() {
        let suffix: u64 = last.parse().ok()?;
        if suffix == 0 || length == 0 {
            return Some(RangeSpec::Unsatisfiable);
        }
        (length.saturating_sub(suffix), length - 1)
    } else {
        let first: u64 = first.parse().ok()?;
        let last: u64 = if last.is_empty() { u64::MAX } else { last.parse().ok()? };
        if last < first {
            return None;
        }
        if first >= length {
            return Some(RangeSpec::Unsatisfiable);
        }
        (first, last.min(length - 1))
    };
    Some(RangeSpec::Satisfiable(range.0, range.1))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::config::sites::CacheRuleConfig;

    fn site() -> (tempfile::TempDir, StaticRoot) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("www");
        std::fs::create_dir_all(root.join("bundles/abc")).unwrap();
        std::fs::write(root.join("index.html"), "<html>index</html>").unwrap();
        std::fs::write(root.join("bundles/abc/app.js"), "console.log(1)").unwrap();
        std::fs::write(root.join("bundles/abc/app.js.br"), "BR").unwrap();
        std::fs::write(root.join("bundles/abc/app.js.gz"), "GZIP").unwrap();
        std::fs::write(dir.path().join("secret.txt"), "secret").unwrap();
        std::os::unix::fs::symlink(dir.path().join("secret.txt"), root.join("leak.txt")).unwrap();
        let config = StaticConfig {
            root: "www".into(),
            index: "index.html".into(),
            fallback: None,
            precompressed: true,
            cache: vec![
                CacheRuleConfig {
                    pattern: "^/bundles/".into(),
                    cache_control: "public, max-age=31536000, immutable".into(),
                },
                CacheRuleConfig { pattern: "^/index\\.html$".into(), cache_control: "no-cache".into() },
            ],
        };
        let root = StaticRoot::from_config(&config, dir.path()).unwrap();
        (dir, root)
    }

    fn get(root: &StaticRoot, path: &str, headers: &[(&'static str, &str)]) -> StaticAnswer {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(*name, value.parse().unwrap());
        }
        root.resolve(&http::Method::GET, path.as_bytes(), &map)
    }

    fn file(answer: StaticAnswer) -> FileAnswer {
        match answer {
            StaticAnswer::File(file) => file,
            other => panic!("expected a file, got {other:?}"),
        }
    }

    fn header<'a>(answer: &'a FileAnswer, name: &str) -> Option<&'a str> {
        answer.headers.iter().find(|(n, _)| *n == name).map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_directory_serves_its_index_with_its_cache_rule() {
        let (_dir, root) = site();
        let index = file(get(&root, "/", &[]));
        assert_eq!((index.status, index.length), (200, 18));
        assert_eq!(header(&index, "Content-Type"), Some("text/html; charset=utf-8"));
        assert_eq!(header(&index, "Cache-Control"), Some("no-cache"));
        assert_eq!(get(&root, "/bundles", &[]), StaticAnswer::AddSlash("/bundles/".into()));
        assert!(matches!(get(&root, "/bundles/", &[]), StaticAnswer::Refuse(e) if e.status == 404));
    }

    #[test]
    fn precompressed_siblings_follow_accept_encoding() {
        let (_dir, root) = site();
        let br = file(get(&root, "/bundles/abc/app.js", &[("accept-encoding", "gzip, deflate, br")]));
        assert_eq!((header(&br, "Content-Encoding"), br.length), (Some("br"), 2));
        assert_eq!(header(&br, "Vary"), Some("Accept-Encoding"));
        assert_eq!(header(&br, "Content-Type"), Some("text/javascript; charset=utf-8"));
        assert_eq!(header(&br, "Cache-Control"), Some("public, max-age=31536000, immutable"));
        let gz = file(get(&root, "/bundles/abc/app.js", &[("accept-encoding", "gzip, br;q=0")]));
        assert_eq!((header(&gz, "Content-Encoding"), gz.length), (Some("gzip"), 4));
        let plain = file(get(&root, "/bundles/abc/app.js", &[]));
        assert_eq!((header(&plain, "Content-Encoding"), plain.length), (None, 14));
        assert_ne!(header(&plain, "ETag"), header(&br, "ETag"));
    }

    #[test]
    fn conditional_requests_get_304() {
        let (_dir, root) = site();
        let first = file(get(&root, "/index.html", &[]));
        let etag = header(&first, "ETag").unwrap().to_string();
        let modified = header(&first, "Last-Modified").unwrap().to_string();
        assert_eq!(file(get(&root, "/index.html", &[("if-none-match", &etag)])).status, 304);
        assert_eq!(file(get(&root, "/index.html", &[("if-none-match", &format!("W/{etag}"))])).status, 304);
        assert_eq!(file(get(&root, "/index.html", &[("if-none-match", "\"other\"")])).status, 200);
        assert_eq!(file(get(&root, "/index.html", &[("if-modified-since", &modified)])).status, 304);
        assert_eq!(
            file(get(&root, "/index.html", &[("if-modified-since", "Thu, 01 Jan 1970 00:00:01 GMT")])).status,
            200
        );
    }

    #[test]
    fn ranges() {
        let (_dir, root) = site();
        let part = file(get(&root, "/index.html", &[("range", "bytes=1-3")]));
        assert_eq!((part.status, part.offset, part.length), (206, 1, 3));
        assert_eq!(header(&part, "Content-Range"), Some("bytes 1-3/18"));
        let tail = file(get(&root, "/index.html", &[("range", "bytes=-5")]));
        assert_eq!((tail.offset, tail.length), (13, 5));
        let open = file(get(&root, "/index.html", &[("range", "bytes=10-")]));
        assert_eq!((open.offset, open.length), (10, 8));
        assert_eq!(file(get(&root, "/index.html", &[("range", "bytes=100-")])).status, 416);
        assert_eq!(file(get(&root, "/index.html", &[("range", "bytes=0-1,3-4")])).status, 200);
        assert_eq!(file(get(&root, "/index.html", &[("range", "bytes=1-3"), ("if-range", "\"old\"")])).status, 200);
    }

    #[test]
    fn nothing_outside_the_root() {
        let (_dir, root) = site();
        for path in [
            "/../secret.txt",
            "/bundles/../../secret.txt",
            "/%2e%2e/secret.txt",
            "/bundles%2f..%2f..%2fsecret.txt",
            "/a\\..\\secret.txt",
            "/%252e%252e/secret.txt",
        ] {
            match get(&root, path, &[]) {
                StaticAnswer::Refuse(e) => assert!(e.status == 400 || e.status == 404, "{path}: {e:?}"),
                other => panic!("{path} served {other:?}"),
            }
        }
        assert!(matches!(get(&root, "/leak.txt", &[]), StaticAnswer::Refuse(e) if e.status == 404));
        assert!(matches!(
            root.resolve(&http::Method::POST, b"/index.html", &HeaderMap::new()),
            StaticAnswer::Refuse(e) if e.status == 405
        ));
    }

    #[test]
    fn the_fallback_answers_unknown_paths() {
        let (dir, _) = site();
        let config = StaticConfig {
            root: "www".into(),
            index: "index.html".into(),
            fallback: Some("index.html".into()),
            precompressed: false,
            cache: vec![],
        };
        let root = StaticRoot::from_config(&config, dir.path()).unwrap();
        let answer = file(get(&root, "/room/!abc:example.com", &[]));
        assert_eq!((answer.status, answer.length), (200, 18));
        assert!(matches!(get(&root, "/../secret.txt", &[]), StaticAnswer::Refuse(e) if e.status == 400));
    }
}
