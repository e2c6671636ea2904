//! One access-log line per request, in the combined format log tools parse
//! (or JSON), with route group, worker, upstream time and request ID.
//! Access tokens never appear: query values are redacted and the
//! `Authorization` header is never logged.

use crate::observe::redact::target_for_log;
use serde::Deserialize;
use std::fmt::Write;
use std::time::SystemTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccessLogFormat {
    #[default]
    Combined,
    Json,
    Off,
}

pub struct Entry<'a> {
    pub client: Option<std::net::IpAddr>,
    pub method: &'a str,
    pub target: &'a [u8],
    pub version: &'a str,
    pub status: u16,
    pub bytes: usize,
    pub referer: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub group: &'a str,
    pub worker: &'a str,
    pub duration_ms: u128,
    pub upstream_ms: Option<u128>,
    pub request_id: &'a str,
    pub edge_error: Option<&'a str>,
    /// Why the edge refused, when the errcode alone does not say.
    pub edge_reason: Option<&'a str>,
}

pub fn line(format: AccessLogFormat, entry: &Entry<'_>, now: SystemTime) -> Option<String> {
    if format == AccessLogFormat::Off {
        return None;
    }
    let client = entry.client.map_or_else(|| "-".to_string(), |ip| ip.to_canonical().to_string());
    let target = target_for_log(entry.target);
    match format {
        AccessLogFormat::Off => None,
        AccessLogFormat::Combined => {
            let mut out = String::with_capacity(256);
            let _ = write!(
                out,
                "{client} - - [{}] \"{} {} {}\" {} {} \"{}\" \"{}\" group={} worker={} upstream_ms={} duration_ms={} request_id={}",
                clf_time(now),
                entry.method,
                target.replace('"', "%22"),
                entry.version,
                entry.status,
                entry.bytes,
                escape(entry.referer.unwrap_or("-")),
                escape(entry.user_agent.unwrap_or("-")),
                entry.group,
                entry.worker,
                entry.upstream_ms.map_or_else(|| "-".to_string(), |ms| ms.to_string()),
                entry.duration_ms,
                entry.request_id,
            );
            if let Some(error) = entry.edge_error {
                let _ = write!(out, " edge_error={error}");
            }
            if let Some(reason) = entry.edge_reason {
                let _ = write!(out, " edge_reason={reason}");
            }
            Some(out)
        }
        AccessLogFormat::Json => Some(
            serde_json::json!({
                "time": clf_time(now),
                "client": client,
                "method": entry.method,
                "target": target,
                "version": entry.version,
                "status": entry.status,
                "bytes": entry.bytes,
                "referer": entry.referer,
                "user_agent": entry.user_agent,
                "group": entry.group,
                "worker": entry.worker,
                "upstream_ms": entry.upstream_ms.map(|ms| ms as u64),
                "duration_ms": entry.duration_ms as u64,
                "request_id": entry.request_id,
                "edge_error": entry.edge_error,
                "edge_reason": entry.edge_reason,
            })
            .to_string(),
        ),
    }
}

fn escape(text: &str) -> String {
    text.replace('\\', "\\\\").replace('"', "\\\"")
}

/// `10/Oct/2000:13:55:36 +0000`, in UTC.
pub fn clf_time(now: SystemTime) -> String {
    let secs = now.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    format!(
        "{day:02}/{}/{year}:{:02}:{:02}:{:02} +0000",
        MONTHS[(month - 1) as usize],
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry() -> Entry<'static> {
        Entry {
            client: Some("::ffff:10.0.0.1".parse().unwrap()),
            method: "GET",
            target: b"/_matrix/client/v3/sync?access_token=syt_secret&since=s1",
            version: "HTTP/1.1",
            status: 200,
            bytes: 512,
            referer: None,
            user_agent: Some("Element \"web\""),
            group: "sample_group",
            worker: "127.0.0.1:8083",
            duration_ms: 31,
            upstream_ms: Some(30),
            request_id: "abc",
            edge_error: None,
            edge_reason: None,
        }
    }

    #[test]
    fn combined_line_is_parseable_and_token_free() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(971_186_136);
        let line = line(AccessLogFormat::Combined, &entry(), now).unwrap();
        assert_eq!(
            line,
            "10.0.0.1 - - [10/Oct/2000:13:55:36 +0000] \"GET /_matrix/client/v3/sync?access_token=<redacted>&since=s1 HTTP/1.1\" 200 512 \"-\" \"Element \\\"web\\\"\" group=sample_group worker=127.0.0.1:8083 upstream_ms=30 duration_ms=31 request_id=abc"
        );
    }

    #[test]
    fn json_line_carries_the_same_fields() {
        let json = line(AccessLogFormat::Json, &entry(), SystemTime::UNIX_EPOCH).unwrap();
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["group"], "sample_group");
        assert_eq!(value["time"], "01/Jan/1970:00:00:00 +0000");
        assert!(!json.contains("syt_secret"));
        assert!(line(AccessLogFormat::Off, &entry(), SystemTime::UNIX_EPOCH).is_none());
    }
}
