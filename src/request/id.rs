//! The ID a request carries through logs and to the upstream.

/// An ID per request for correlating logs: the edge's own (a per-process
/// prefix and a counter, as 16 hex digits), or the one a trusted proxy in
/// front gave it. Rendered once: the header to the upstream and the access
/// line read the same text.
pub enum RequestId {
    Own([u8; 16]),
    Kept(Box<str>),
}

static REQUEST_COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static PROCESS_PREFIX: once_cell::sync::Lazy<u64> = once_cell::sync::Lazy::new(|| {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    (u64::from(std::process::id()) << 32 | u64::from(nanos)) << 24
});

impl RequestId {
    pub fn next() -> RequestId {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let id = *PROCESS_PREFIX ^ REQUEST_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut text = [0u8; 16];
        for (at, digit) in text.iter_mut().enumerate() {
            *digit = HEX[((id >> (60 - 4 * at)) & 0xf) as usize];
        }
        RequestId::Own(text)
    }

    pub fn as_str(&self) -> &str {
        match self {
            // Hex digits only, so always UTF-8.
            RequestId::Own(text) => std::str::from_utf8(text).unwrap_or_default(),
            RequestId::Kept(text) => text,
        }
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_request_ids_are_sixteen_lowercase_hex_digits_of_the_counter() {
        let first = RequestId::next();
        let second = RequestId::next();
        for id in [&first, &second] {
            assert_eq!(id.as_str().len(), 16);
            assert!(id.as_str().bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{id}");
        }
        let value = |id: &RequestId| u64::from_str_radix(id.as_str(), 16).unwrap_or_default();
        // The counter under the prefix grows.
        assert!(value(&second) ^ *PROCESS_PREFIX > value(&first) ^ *PROCESS_PREFIX);
        assert_eq!(first.as_str(), format!("{:016x}", value(&first)));
    }
}
