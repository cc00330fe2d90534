//! HTTP/2 over cleartext by `Upgrade: h2c` (RFC 7540 §3.2), which is how cargo asks for HTTP/2
//! on a `http://` registry.
//!
//! hyper serves HTTP/1.1 and HTTP/2 with prior knowledge but cannot take over an upgraded
//! HTTP/1.1 request as stream 1 of a new HTTP/2 connection. So the proxy does the upgrade
//! itself: it answers `101 Switching Protocols`, waits for the client's connection preface and
//! first SETTINGS frame, and then hands hyper's HTTP/2 server a byte stream that reads
//!
//! ```text
//! client preface + client SETTINGS | HEADERS for stream 1 (the upgraded request) | the rest
//! ```
//!
//! so the upgraded request is served on stream 1 exactly like any later request on streams
//! 3, 5, …. Only body-less requests are upgraded (cargo's are all GETs); a request with a body
//! stays on HTTP/1.1, which RFC 7540 allows.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use axum::http::{self, HeaderMap, Method, Request, Uri, Version, header};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// The fixed start of every HTTP/2 client connection.
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// The smallest SETTINGS_MAX_FRAME_SIZE a peer may announce; ours is at least this.
const MAX_FRAME: usize = 16_384;
/// Largest first SETTINGS frame we accept from a client (a few dozen bytes in practice).
const MAX_SETTINGS: usize = 1024;

/// Whether `req` asks to switch to HTTP/2 over cleartext and can: HTTP/1.1, `Upgrade: h2c`,
/// one `HTTP2-Settings` header, `Connection` naming both, an origin-form target, no body, and
/// headers within `max_header_list` as HTTP/2 counts them (name + value + 32 each), so a
/// request HTTP/1.1 would serve is never refused for having been upgraded.
pub fn wants_upgrade<B: http_body::Body>(req: &Request<B>, max_header_list: usize) -> bool {
    if req.version() != Version::HTTP_11 {
        return false;
    }
    let h = req.headers();
    let Some(upgrade) = h.get(header::UPGRADE) else {
        return false;
    };
    let offers_h2c = upgrade
        .to_str()
        .is_ok_and(|v| v.split(',').any(|p| p.trim().eq_ignore_ascii_case("h2c")));
    if !offers_h2c || h.get_all("http2-settings").iter().count() != 1 {
        return false;
    }
    let connection_tokens = |token: &str| {
        h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !connection_tokens("upgrade") || !connection_tokens("http2-settings") {
        return false;
    }
    let has_body = h.contains_key(header::TRANSFER_ENCODING)
        || h.get(header::CONTENT_LENGTH).is_some_and(|v| v != "0")
        || !req.body().is_end_stream();
    let list_size: usize = h
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 32)
        .sum::<usize>()
        + req.uri().path_and_query().map_or(0, |p| p.as_str().len())
        + req.method().as_str().len()
        + 4 * 42; // the pseudo-headers' names, "http" and their overheads, generously
    !has_body
        && list_size <= max_header_list
        && req.uri().path_and_query().is_some()
        && req.uri().scheme().is_none()
}

/// The `101 Switching Protocols` answer to an upgrade request.
pub fn switching_protocols<B: Default>() -> http::Response<B> {
    let mut res = http::Response::new(B::default());
    *res.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
    res.headers_mut().insert(
        header::CONNECTION,
        header::HeaderValue::from_static("Upgrade"),
    );
    res.headers_mut()
        .insert(header::UPGRADE, header::HeaderValue::from_static("h2c"));
    res
}

/// The HEADERS (and, if needed, CONTINUATION) frames that open stream 1 with the upgraded
/// request, half-closed by the client (END_STREAM: the request has no body).
pub fn stream_one_frames(method: &Method, uri: &Uri, headers: &HeaderMap) -> Bytes {
    let authority = headers
        .get(header::HOST)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .as_bytes();
    let mut block = BytesMut::new();
    literal(&mut block, b":method", method.as_str().as_bytes());
    literal(&mut block, b":scheme", b"http");
    literal(&mut block, b":path", path);
    if !authority.is_empty() {
        literal(&mut block, b":authority", authority);
    }
    // Headers named by `Connection`, and connection-specific headers, end with HTTP/1.1.
    let hop_by_hop: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    for (name, value) in headers {
        let n = name.as_str(); // always lower case
        let connection_specific = matches!(
            n,
            "connection"
                | "upgrade"
                | "http2-settings"
                | "keep-alive"
                | "proxy-connection"
                | "transfer-encoding"
                | "host"
        ) || (n == "te" && value != "trailers")
            || hop_by_hop.iter().any(|h| h == n);
        if !connection_specific {
            literal(&mut block, n.as_bytes(), value.as_bytes());
        }
    }
    let block = block.freeze();
    let mut out = BytesMut::with_capacity(block.len() + FRAME_HEADER * 2);
    let mut chunks = block.chunks(MAX_FRAME).peekable();
    let mut first = true;
    // An empty block cannot happen (`:method` is always there), but keep one frame regardless.
    if chunks.peek().is_none() {
        frame(&mut out, HEADERS, END_STREAM | END_HEADERS, &[]);
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        let (kind, mut flags) = if first {
            (HEADERS, END_STREAM)
        } else {
            (CONTINUATION, 0)
        };
        if last {
            flags |= END_HEADERS;
        }
        frame(&mut out, kind, flags, chunk);
        first = false;
    }
    out.freeze()
}

fn frame(out: &mut BytesMut, kind: u8, flags: u8, payload: &[u8]) {
    let len = payload.len() as u32;
    out.put_slice(&len.to_be_bytes()[1..]);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u32(1); // stream 1
    out.put_slice(payload);
}

/// HPACK "literal header field without indexing, new name" (RFC 7541 §6.2.2), no Huffman.
fn literal(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_u8(0);
    string(out, name);
    string(out, value);
}

fn string(out: &mut BytesMut, s: &[u8]) {
    integer(out, s.len(), 7, 0);
    out.put_slice(s);
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 §5.1).
fn integer(out: &mut BytesMut, mut v: usize, n: u32, first_bits: u8) {
    let max = (1usize << n) - 1;
    if v < max {
        out.put_u8(first_bits | v as u8);
        return;
    }
    out.put_u8(first_bits | max as u8);
    v -= max;
    while v >= 128 {
        out.put_u8((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.put_u8(v as u8);
}

/// Reads the client's connection preface and first SETTINGS frame from `io` and returns
/// everything read so far, with `stream_one` spliced in right after that SETTINGS frame.
pub async fn splice_preface<IO: AsyncRead + Unpin>(
    io: &mut IO,
    stream_one: &[u8],
) -> io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(256);
    let settings_end = loop {
        if buf.len() >= PREFACE.len() + FRAME_HEADER {
            if &buf[..PREFACE.len()] != PREFACE || buf[PREFACE.len() + 3] != SETTINGS {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "h2c upgrade: the client did not send the HTTP/2 preface",
                ));
            }
            let h = &buf[PREFACE.len()..];
            let len = u32::from_be_bytes([0, h[0], h[1], h[2]]) as usize;
            if len > MAX_SETTINGS {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "h2c upgrade: oversized SETTINGS frame",
                ));
            }
            let end = PREFACE.len() + FRAME_HEADER + len;
            if buf.len() >= end {
                break end;
            }
        } else if !PREFACE.starts_with(&buf[..buf.len().min(PREFACE.len())]) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "h2c upgrade: the client did not send the HTTP/2 preface",
            ));
        }
        if io.read_buf(&mut buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    };
    let rest = buf.split_off(settings_end);
    buf.reserve(stream_one.len() + rest.len());
    buf.put_slice(stream_one);
    buf.put_slice(&rest);
    Ok(buf.freeze())
}

/// An I/O object that first yields `prefix`, then reads from `inner`; writes go to `inner`.
pub struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T> Prefixed<T> {
    pub fn new(prefix: Bytes, inner: T) -> Self {
        Prefixed { prefix, inner }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.has_remaining() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpack_integers_match_the_rfc_examples() {
        // RFC 7541 C.1.1 and C.1.2.
        let mut b = BytesMut::new();
        integer(&mut b, 10, 5, 0);
        assert_eq!(&b[..], &[0b01010]);
        let mut b = BytesMut::new();
        integer(&mut b, 1337, 5, 0);
        assert_eq!(&b[..], &[0b11111, 0b10011010, 0b00001010]);
    }

    fn wants_upgrade_default<B: http_body::Body>(req: &Request<B>) -> bool {
        wants_upgrade(req, 16 * 1024)
    }

    #[test]
    fn upgrade_is_only_for_bodyless_http11_with_settings() {
        let req = |f: &dyn Fn(http::request::Builder) -> http::request::Builder| {
            f(Request::get("/index/config.json").version(Version::HTTP_11))
                .body(axum::body::Body::empty())
                .unwrap()
        };
        let ok = |b: http::request::Builder| {
            b.header("connection", "Upgrade, HTTP2-Settings")
                .header("upgrade", "h2c")
                .header("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA")
        };
        assert!(wants_upgrade_default(&req(&ok)));
        assert!(!wants_upgrade_default(&req(&|b| b)));
        assert!(!wants_upgrade_default(&req(
            &|b| ok(b).version(Version::HTTP_10)
        )));
        assert!(!wants_upgrade_default(&req(
            &|b| ok(b).header("content-length", "5")
        )));
        assert!(!wants_upgrade_default(&req(&|b| {
            b.header("connection", "Upgrade").header("upgrade", "h2c")
        })));
        assert!(!wants_upgrade_default(&req(&|b| {
            b.header("connection", "Upgrade, HTTP2-Settings")
                .header("upgrade", "websocket")
                .header("http2-settings", "")
        })));
        // Headers HTTP/2 would count over the limit: stays on HTTP/1.1.
        let big = req(&|b| ok(b).header("x-big", "a".repeat(9000)));
        assert!(wants_upgrade(&big, 16 * 1024));
        assert!(!wants_upgrade(&big, 8 * 1024));
    }

    #[test]
    fn stream_one_splits_into_continuation_frames() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "proxy:8080".parse().unwrap());
        h.insert("x-big", "a".repeat(40_000).parse().unwrap());
        h.insert(
            header::CONNECTION,
            "Upgrade, HTTP2-Settings".parse().unwrap(),
        );
        let out = stream_one_frames(&Method::GET, &"/x".parse().unwrap(), &h);
        let mut kinds = Vec::new();
        let mut rest = &out[..];
        while !rest.is_empty() {
            let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
            kinds.push((rest[3], rest[4]));
            assert!(len <= MAX_FRAME);
            rest = &rest[FRAME_HEADER + len..];
        }
        assert_eq!(
            kinds,
            vec![
                (HEADERS, END_STREAM),
                (CONTINUATION, 0),
                (CONTINUATION, END_HEADERS)
            ]
        );
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains(":authority") && text.contains("proxy:8080"));
        assert!(!text.contains("connection") && !text.contains("Upgrade"));
    }

    #[tokio::test]
    async fn the_preface_is_checked_and_stream_one_spliced_in() {
        let settings = [0, 0, 6, SETTINGS, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100];
        let mut input = PREFACE.to_vec();
        input.extend_from_slice(&settings);
        input.extend_from_slice(b"NEXT");
        let mut io = tokio_test_reader(&input);
        let out = splice_preface(&mut io, b"ONE").await.unwrap();
        let mut want = PREFACE.to_vec();
        want.extend_from_slice(&settings);
        want.extend_from_slice(b"ONE");
        let rest_start = want.len();
        assert_eq!(&out[..rest_start], &want[..]);
        // Whatever came after the SETTINGS frame follows, possibly partly still unread.
        let mut all = out[rest_start..].to_vec();
        io.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"NEXT");

        let mut bad = &b"GET / HTTP/1.1\r\n\r\n"[..];
        assert!(splice_preface(&mut bad, b"ONE").await.is_err());
        let mut short = &PREFACE[..10];
        assert!(splice_preface(&mut short, b"ONE").await.is_err());
    }

    /// A reader that hands out at most 5 bytes per read, as a network might.
    fn tokio_test_reader(data: &[u8]) -> impl AsyncRead + Unpin {
        use tokio::io::AsyncWriteExt;
        let (mut tx, rx) = tokio::io::duplex(5);
        let data = data.to_vec();
        tokio::spawn(async move { tx.write_all(&data).await });
        rx
    }
}
