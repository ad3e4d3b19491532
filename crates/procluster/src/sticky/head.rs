//! Finding a sticky key in the bytes a client sent so far (peeked, so each
//! look starts from the first byte). No IO.

use super::{KeyName, StickyKey};

/// What the bytes so far say about the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Found<'a> {
    /// The key's value.
    Key(&'a [u8]),
    /// The bytes cannot have the key: a head complete without it, or not
    /// an HTTP request (a TLS handshake, binary data).
    Never,
    /// Not yet: more bytes may bring it.
    Incomplete,
}

/// Longest method token accepted before the bytes are taken for something
/// other than HTTP.
const MAX_METHOD: usize = 16;

/// Looks for `key` in `bytes`, the beginning of what a client sent. `full`
/// says that no more bytes will be looked at (the size limit is reached, or
/// the client closed its side): an incomplete head is then `Never`.
pub(crate) fn find<'a>(bytes: &'a [u8], key: &StickyKey, full: bool) -> Found<'a> {
    let found = search(bytes, key);
    match found {
        Found::Incomplete if full => Found::Never,
        other => other,
    }
}

fn search<'a>(bytes: &'a [u8], key: &StickyKey) -> Found<'a> {
    // The method: upper-case letters, then a space. Anything else (a TLS
    // ClientHello starts with 0x16) is not HTTP.
    let method_end = match bytes.iter().position(|b| *b == b' ') {
        Some(0) => return Found::Never,
        Some(n) if n <= MAX_METHOD => n,
        Some(_) => return Found::Never,
        None if bytes.len() > MAX_METHOD => return Found::Never,
        None => bytes.len(),
    };
    if !bytes[..method_end].iter().all(u8::is_ascii_uppercase) {
        return Found::Never;
    }
    let Some(line_end) = find_subslice(bytes, b"\n") else {
        return Found::Incomplete;
    };
    let request_line = trim_cr(&bytes[..line_end]);
    match key {
        StickyKey::Address { .. } => Found::Never,
        StickyKey::Query(name) => query_value(request_line, name).map_or(Found::Never, Found::Key),
        StickyKey::Header(name) | StickyKey::Cookie(name) => {
            let mut rest = &bytes[line_end + 1..];
            loop {
                let Some(end) = find_subslice(rest, b"\n") else {
                    return Found::Incomplete;
                };
                let line = trim_cr(&rest[..end]);
                if line.is_empty() {
                    // The end of the head.
                    return Found::Never;
                }
                if let Some(value) = header_value(line, name, matches!(key, StickyKey::Cookie(_))) {
                    return Found::Key(value);
                }
                rest = &rest[end + 1..];
            }
        }
    }
}

fn find_subslice(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// The value of parameter `name` in the target of a request line.
fn query_value<'a>(request_line: &'a [u8], name: &KeyName) -> Option<&'a [u8]> {
    let mut parts = request_line.split(|b| *b == b' ');
    parts.next()?;
    let target = parts.next()?;
    let target = target.split(|b| *b == b'#').next()?;
    let query = &target[target.iter().position(|b| *b == b'?')? + 1..];
    query.split(|b| *b == b'&').find_map(|pair| {
        let (key, value) = split_once(pair, b'=')?;
        (key == name.as_bytes() && !value.is_empty()).then_some(value)
    })
}

/// The value of header `name` in a header line, or, for a cookie, of
/// cookie `name` in a `Cookie` header line.
fn header_value<'a>(line: &'a [u8], name: &KeyName, cookie: bool) -> Option<&'a [u8]> {
    let (header, value) = split_once(line, b':')?;
    let wanted: &[u8] = if cookie { b"cookie" } else { name.as_bytes() };
    if !header.eq_ignore_ascii_case(wanted) {
        return None;
    }
    let value = trim(value);
    if !cookie {
        return (!value.is_empty()).then_some(value);
    }
    value.split(|b| *b == b';').find_map(|pair| {
        let (key, value) = split_once(trim(pair), b'=')?;
        let value = trim(value);
        let value = value
            .strip_prefix(b"\"")
            .and_then(|v| v.strip_suffix(b"\""))
            .unwrap_or(value);
        (trim(key) == name.as_bytes() && !value.is_empty()).then_some(value)
    })
}

fn split_once(bytes: &[u8], separator: u8) -> Option<(&[u8], &[u8])> {
    let at = bytes.iter().position(|b| *b == separator)?;
    Some((&bytes[..at], &bytes[at + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> StickyKey {
        text.parse().unwrap()
    }

    const REQUEST: &[u8] = b"GET /socket.io/?EIO=4&transport=polling&sid=abc#top HTTP/1.1\r\n\
Host: example.com\r\nX-Session:  s-42 \r\nCookie: theme=dark; sid=\"c9\"; io=z\r\n\r\n";

    #[test]
    fn each_kind_of_key_is_found() {
        assert_eq!(find(REQUEST, &key("query=sid"), false), Found::Key(b"abc"));
        assert_eq!(find(REQUEST, &key("query=EIO"), false), Found::Key(b"4"));
        assert_eq!(
            find(REQUEST, &key("header=x-session"), false),
            Found::Key(b"s-42")
        );
        assert_eq!(find(REQUEST, &key("cookie=sid"), false), Found::Key(b"c9"));
        assert_eq!(find(REQUEST, &key("cookie=io"), false), Found::Key(b"z"));
    }

    #[test]
    fn a_complete_head_without_the_key_never_has_it() {
        assert_eq!(find(REQUEST, &key("cookie=user"), false), Found::Never);
        assert_eq!(find(REQUEST, &key("query=user"), false), Found::Never);
        assert_eq!(find(REQUEST, &key("header=user"), false), Found::Never);
        // A cookie named in another header does not count.
        let head = b"GET / HTTP/1.1\r\nX-Cookie: sid=1\r\n\r\n";
        assert_eq!(find(head, &key("cookie=sid"), false), Found::Never);
    }

    #[test]
    fn a_partial_head_waits_for_more_unless_no_more_comes() {
        let cookie_end = find_subslice(REQUEST, b"io=z\r\n").unwrap() + 6;
        for cut in 1..REQUEST.len() {
            let part = &REQUEST[..cut];
            let found = find(part, &key("cookie=sid"), false);
            let complete = cut >= cookie_end;
            assert!(
                found == Found::Incomplete || complete && found == Found::Key(b"c9"),
                "{cut}: {found:?}"
            );
            assert_ne!(find(part, &key("cookie=sid"), true), Found::Incomplete);
        }
        // The query is known once the request line is.
        assert_eq!(
            find(b"GET /?sid=1 HTTP/1.1\r\n", &key("query=sid"), false),
            Found::Key(b"1")
        );
    }

    #[test]
    fn what_is_not_http_never_has_a_key() {
        let client_hello = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc];
        assert_eq!(find(&client_hello, &key("cookie=sid"), false), Found::Never);
        assert_eq!(
            find(b"\x00\x01binary", &key("header=a"), false),
            Found::Never
        );
        assert_eq!(
            find(b"get / HTTP/1.1", &key("query=a"), false),
            Found::Never
        );
        assert_eq!(
            find(&[b'A'; MAX_METHOD + 1], &key("query=a"), false),
            Found::Never
        );
        assert_eq!(find(b"GE", &key("query=a"), false), Found::Incomplete);
    }
}
