//! The JSON primitives the audit line is written with: strings escaped exactly as `serde_json`
//! escapes them, integers, booleans, `null`, RFC 3339 timestamps and socket addresses, appended
//! to a byte buffer.
//!
//! Why not `serde_json`: the audit writer serialized every event through serde, which escaped
//! each constant key again, formatted numbers and addresses through `core::fmt`, and checked
//! every string byte against a table one at a time; that was a quarter of the proxy's
//! instructions per plain request (docs/benchmarks.md). Output is byte-for-byte what serde_json
//! wrote (the tests compare the two).

use std::io::Write;
use std::net::SocketAddr;

/// Whether `b` must be escaped inside a JSON string.
fn must_escape(b: u8) -> bool {
    b < 0x20 || b == b'"' || b == b'\\'
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Whether any of the eight bytes in `x` must be escaped (or, with `ascii_only`, is not ASCII):
/// word-at-a-time tests, exact for "any" (a borrow can only mark lanes above a true one).
fn word_needs_care(x: u64, ascii_only: bool) -> bool {
    let zero_in = |v: u64| v.wrapping_sub(ONES) & !v & HIGHS;
    let control = x.wrapping_sub(ONES * 0x20) & !x & HIGHS;
    let quote = zero_in(x ^ (ONES * u64::from(b'"')));
    let backslash = zero_in(x ^ (ONES * u64::from(b'\\')));
    let high = if ascii_only { x & HIGHS } else { 0 };
    control | quote | backslash | high != 0
}

/// Whether `bytes` can be copied into a JSON string as they are: nothing to escape, and with
/// `ascii_only` nothing outside ASCII either. Eight bytes at a time: most values pass.
fn plain(bytes: &[u8], ascii_only: bool) -> bool {
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let mut lanes = [0u8; 8];
        lanes.copy_from_slice(word);
        if word_needs_care(u64::from_le_bytes(lanes), ascii_only) {
            return false;
        }
    }
    // The tail as one more word, padded with a byte that needs no care.
    let tail = words.remainder();
    let mut lanes = [b'a'; 8];
    lanes[..tail.len()].copy_from_slice(tail);
    !word_needs_care(u64::from_le_bytes(lanes), ascii_only)
}

/// Appends a header name as a JSON string: header names are tokens (RFC 9110 §5.1), which
/// never need escaping.
pub fn header_name(out: &mut Vec<u8>, name: &http::HeaderName) {
    out.push(b'"');
    out.extend_from_slice(name.as_str().as_bytes());
    out.push(b'"');
}

/// Appends `s` as a JSON string.
pub fn string(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    let bytes = s.as_bytes();
    if plain(bytes, false) {
        out.extend_from_slice(bytes);
    } else {
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            if must_escape(b) {
                out.extend_from_slice(&bytes[start..i]);
                escape(out, b);
                start = i + 1;
            }
        }
        out.extend_from_slice(&bytes[start..]);
    }
    out.push(b'"');
}

/// Appends bytes that may not be UTF-8 as a JSON string, invalid sequences replaced by U+FFFD
/// (as `String::from_utf8_lossy` does).
pub fn lossy_string(out: &mut Vec<u8>, bytes: &[u8]) {
    // Plain ASCII (nearly every header value) is valid UTF-8 with nothing to escape.
    if plain(bytes, true) {
        out.push(b'"');
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    match std::str::from_utf8(bytes) {
        Ok(s) => string(out, s),
        Err(_) => string(out, &String::from_utf8_lossy(bytes)),
    }
}

fn escape(out: &mut Vec<u8>, b: u8) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    match b {
        b'"' => out.extend_from_slice(b"\\\""),
        b'\\' => out.extend_from_slice(b"\\\\"),
        b'\n' => out.extend_from_slice(b"\\n"),
        b'\r' => out.extend_from_slice(b"\\r"),
        b'\t' => out.extend_from_slice(b"\\t"),
        0x08 => out.extend_from_slice(b"\\b"),
        0x0c => out.extend_from_slice(b"\\f"),
        _ => out.extend_from_slice(&[
            b'\\',
            b'u',
            b'0',
            b'0',
            HEX[usize::from(b >> 4)],
            HEX[usize::from(b & 0xf)],
        ]),
    }
}

/// Appends `s` as a JSON string, or `null`.
pub fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => null(out),
    }
}

/// Appends `null`.
pub fn null(out: &mut Vec<u8>) {
    out.extend_from_slice(b"null");
}

/// Appends `true` or `false`.
pub fn boolean(out: &mut Vec<u8>, b: bool) {
    out.extend_from_slice(if b { b"true" } else { b"false" });
}

/// Appends an unsigned integer.
pub fn integer(out: &mut Vec<u8>, n: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Appends a float as serde_json does (shortest round-trip form; `null` when not finite).
pub fn float(out: &mut Vec<u8>, f: f64) {
    if f.is_finite() {
        out.extend_from_slice(zmij::Buffer::new().format_finite(f).as_bytes());
    } else {
        null(out);
    }
}

/// Appends `n` as a JSON string of 16 lowercase hex digits.
pub fn hex_id(out: &mut Vec<u8>, n: u64) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut buf = [b'"'; 18];
    for (i, slot) in buf[1..17].iter_mut().enumerate() {
        *slot = HEX[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    out.extend_from_slice(&buf);
}

/// Appends an RFC 3339 UTC timestamp with microseconds (`"2026-11-23T15:04:05.123456Z"`).
pub fn timestamp(out: &mut Vec<u8>, t: time::OffsetDateTime) {
    let t = t.to_offset(time::UtcOffset::UTC);
    let mut buf = *b"\"0000-00-00T00:00:00.000000Z\"";
    digits(&mut buf[1..5], t.year().clamp(0, 9999) as u32);
    digits(&mut buf[6..8], u32::from(u8::from(t.month())));
    digits(&mut buf[9..11], u32::from(t.day()));
    digits(&mut buf[12..14], u32::from(t.hour()));
    digits(&mut buf[15..17], u32::from(t.minute()));
    digits(&mut buf[18..20], u32::from(t.second()));
    digits(&mut buf[21..27], t.microsecond());
    out.extend_from_slice(&buf);
}

/// Writes `n` into `slot` as zero-padded decimal digits (the high digits beyond its width are
/// dropped).
fn digits(slot: &mut [u8], mut n: u32) {
    for d in slot.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
}

/// Appends a socket address as a JSON string (`"10.1.2.3:443"`, `"[::1]:443"`).
pub fn socket_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            out.push(b'"');
            let mut n = itoa::Buffer::new();
            for (i, octet) in v4.ip().octets().iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(n.format(*octet).as_bytes());
            }
            out.push(b':');
            out.extend_from_slice(n.format(v4.port()).as_bytes());
            out.push(b'"');
        }
        SocketAddr::V6(_) => {
            out.push(b'"');
            // Writing to a Vec cannot fail.
            let _ = write!(out, "{addr}");
            out.push(b'"');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn written(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        f(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn strings_are_escaped_as_serde_json_escapes_them() {
        let mut every: String = (0u8..0x80).map(char::from).collect();
        every.push_str("é€😀 \"quoted\" back\\slash /slash");
        for s in [
            "",
            "plain",
            every.as_str(),
            "\u{7f}\u{1f}",
            "tab\there",
            "eight ch\"rs and more \\ to 16+",
            "ends with a control\u{1}",
            "0123456789abcde\u{0}",
        ] {
            assert_eq!(written(|o| string(o, s)), serde_json::to_string(s).unwrap());
        }
        for bytes in [
            &b"ok\xff\xfe\""[..],
            "caf\u{e9} \"x\" 12345678".as_bytes(),
            b"plain ascii value",
            b"0123456\x1f89abcdef",
            b"\x7f\x80",
        ] {
            assert_eq!(
                written(|o| lossy_string(o, bytes)),
                serde_json::to_string(&String::from_utf8_lossy(bytes)).unwrap()
            );
        }
    }

    #[test]
    fn the_word_test_agrees_with_the_byte_test_for_every_byte_in_every_lane() {
        for ascii_only in [false, true] {
            let care = |b: u8| must_escape(b) || (ascii_only && !b.is_ascii());
            for filler in [b'a', b' ', 0x7f, b'~'] {
                for lane in 0..8 {
                    for b in 0..=255u8 {
                        let mut word = [filler; 8];
                        word[lane] = b;
                        assert_eq!(
                            word_needs_care(u64::from_le_bytes(word), ascii_only),
                            care(b) || care(filler),
                            "byte {b:#x} in lane {lane}, filler {filler:#x}, ascii_only {ascii_only}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn no_byte_a_header_name_may_hold_needs_escaping() {
        for b in 0..=255u8 {
            if let Ok(name) = http::HeaderName::from_bytes(&[b, b'x']) {
                assert_eq!(
                    written(|o| header_name(o, &name)),
                    serde_json::to_string(name.as_str()).unwrap()
                );
            }
        }
    }

    #[test]
    fn numbers_and_addresses_match_serde_json() {
        for n in [0u64, 7, 10, 65_535, u64::MAX] {
            assert_eq!(
                written(|o| integer(o, n)),
                serde_json::to_string(&n).unwrap()
            );
        }
        for f in [0.0, 12.3, 0.001, 1234.567, 1e-7, 1e21] {
            assert_eq!(written(|o| float(o, f)), serde_json::to_string(&f).unwrap());
        }
        assert_eq!(written(|o| float(o, f64::NAN)), "null");
        for a in [
            "10.1.2.3:51234",
            "0.0.0.0:0",
            "[::1]:443",
            "[2001:db8::1%3]:80",
        ] {
            let addr: SocketAddr = a.parse().unwrap();
            assert_eq!(written(|o| socket_addr(o, addr)), format!("\"{addr}\""));
        }
        assert_eq!(
            written(|o| hex_id(o, 0xa1b2_c3d4_e5f6)),
            "\"0000a1b2c3d4e5f6\""
        );
        assert_eq!(written(|o| hex_id(o, u64::MAX)), "\"ffffffffffffffff\"");
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(1_795_446_245_123_456_789).unwrap();
        assert_eq!(
            written(|o| timestamp(o, t)),
            "\"2026-11-23T15:04:05.123456Z\""
        );
        assert_eq!(
            written(|o| timestamp(o, time::OffsetDateTime::UNIX_EPOCH)),
            "\"1970-01-01T00:00:00.000000Z\""
        );
    }
}
