//! HTTP/2 frames and HPACK fields written by hand, so tests can send what a
//! well-behaved HTTP/2 library refuses to.

/// One frame: length, type, flags, stream and payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// An HPACK literal without indexing: a static-table name index, or a new
/// name when `name_index` is 0 (short names and values only).
pub fn literal(name_index: u8, name: &str, value: &str) -> Vec<u8> {
    let mut out = vec![name_index];
    if name_index == 0 {
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
    }
    out.push(value.len() as u8);
    out.extend_from_slice(value.as_bytes());
    out
}

/// The client connection preface and an empty SETTINGS frame.
pub fn preface() -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[]));
    out
}
