//! The spec's canonical JSON, written exactly as Synapse's encoder
//! (python-canonicaljson: `ensure_ascii=False`, `sort_keys=True`, no
//! spaces) writes the same value, or a refusal where the two could differ.
//!
//! Python escapes `"`, `\`, and control characters only (`\n`, `\r`, `\t`,
//! `\b`, `\f` short, the rest `\u00XX` in lower-case hex) and writes every
//! other character as UTF-8; keys sort by code point, which for UTF-8 is
//! byte order. Floats and integers beyond ±(2^53−1) are outside the spec,
//! and Python would print them its own way: such a value is not encoded
//! (the request is passed on unverified; Synapse checks it again).

use serde_json::Value;

/// Why a value has no canonical form this encoder vouches for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotCanonical {
    Float,
    LargeInteger,
}

impl NotCanonical {
    pub fn reason(self) -> &'static str {
        match self {
            NotCanonical::Float => "float",
            NotCanonical::LargeInteger => "large_integer",
        }
    }
}

const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

pub fn encode(value: &Value) -> Result<Vec<u8>, NotCanonical> {
    let mut out = Vec::with_capacity(256);
    write(value, &mut out)?;
    Ok(out)
}

fn write(value: &Value, out: &mut Vec<u8>) -> Result<(), NotCanonical> {
    match value {
        Value::Null => out.extend_from_slice(b"null"),
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Number(number) => {
            let magnitude = match (number.as_u64(), number.as_i64()) {
                (Some(unsigned), _) => unsigned,
                (None, Some(signed)) => signed.unsigned_abs(),
                (None, None) => return Err(NotCanonical::Float),
            };
            if magnitude > MAX_SAFE_INTEGER {
                return Err(NotCanonical::LargeInteger);
            }
            out.extend_from_slice(number.to_string().as_bytes());
        }
        Value::String(text) => write_string(text, out),
        Value::Array(items) => {
            out.push(b'[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write(item, out)?;
            }
            out.push(b']');
        }
        Value::Object(map) => {
            // serde_json's map is usually sorted already, but a dependency
            // enabling `preserve_order` would silently change that.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_unstable_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            out.push(b'{');
            for (index, (key, item)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(b',');
                }
                write_string(key, out);
                out.push(b':');
                write(item, out)?;
            }
            out.push(b'}');
        }
    }
    Ok(())
}

fn write_string(text: &str, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.push(b'"');
    let bytes = text.as_bytes();
    let mut start = 0;
    for (index, &byte) in bytes.iter().enumerate() {
        let escape: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => {
                out.extend_from_slice(&bytes[start..index]);
                out.extend_from_slice(b"\\u00");
                out.push(HEX[usize::from(byte >> 4)]);
                out.push(HEX[usize::from(byte & 0xf)]);
                start = index + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&bytes[start..index]);
        out.extend_from_slice(escape);
        start = index + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(value: Value) -> String {
        String::from_utf8(encode(&value).expect("canonical")).expect("utf-8")
    }

    #[test]
    fn keys_sort_by_code_point_and_nothing_is_spaced() {
        let value = json!({"b": 1, "a": {"é": [1, 2], "z": null, "Z": true}, "": "x"});
        assert_eq!(text(value), r#"{"":"x","a":{"Z":true,"z":null,"é":[1,2]},"b":1}"#);
    }

    #[test]
    fn strings_escape_as_python_does_with_ensure_ascii_off() {
        let value = json!("q\"b\\n\nr\rt\tb\u{8}f\u{c}\u{1}\u{1f}\u{7f}é\u{2028}😀");
        assert_eq!(text(value), "\"q\\\"b\\\\n\\nr\\rt\\tb\\bf\\f\\u0001\\u001f\u{7f}é\u{2028}😀\"");
    }

    #[test]
    fn floats_and_unsafe_integers_are_not_vouched_for() {
        assert_eq!(encode(&json!({"a": 1.5})), Err(NotCanonical::Float));
        assert_eq!(encode(&json!([9007199254740992u64])), Err(NotCanonical::LargeInteger));
        assert_eq!(encode(&json!(-9007199254740992i64)), Err(NotCanonical::LargeInteger));
        assert_eq!(
            text(json!([9007199254740991u64, -9007199254740991i64, 0, -1])),
            "[9007199254740991,-9007199254740991,0,-1]"
        );
    }
}
