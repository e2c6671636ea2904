//! Keeps access tokens out of logs.

use std::borrow::Cow;

/// The request target with every `access_token` query value replaced.
pub fn target_for_log(target: &[u8]) -> Cow<'_, str> {
    let text = String::from_utf8_lossy(target);
    let Some((path, query)) = text.split_once('?') else {
        return text;
    };
    if !query.to_ascii_lowercase().contains("access_token") {
        return text;
    }
    let redacted: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((key, _)) if key.eq_ignore_ascii_case("access_token") => {
                format!("{key}=<redacted>")
            }
            _ => pair.to_string(),
        })
        .collect();
    Cow::Owned(format!("{path}?{}", redacted.join("&")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_removed_from_queries() {
        assert_eq!(
            target_for_log(b"/_matrix/client/v3/sync?since=s1&access_token=syt_abc_def&x=1"),
            "/_matrix/client/v3/sync?since=s1&access_token=<redacted>&x=1"
        );
        assert_eq!(target_for_log(b"/_matrix/client/versions"), "/_matrix/client/versions");
    }
}
