//! Application property names keep their case over HTTP/1 (IoT Hub never modifies application
//! properties): `iothub-app-firmwareChannel` on a D2C send is recorded as `firmwareChannel`, and a
//! C2D message's `firmwareChannel` property goes back to an HTTP device as
//! `iothub-app-firmwareChannel`, not lower-cased.
//!
//! `http::HeaderName` is always lower case. hyper keeps the spellings separately: an HTTP/1
//! connection built with `preserve_header_case` records the spelling of every request header name
//! in a request extension, and writes a response's header names with the spellings such an
//! extension carries. That extension's type is private to hyper, so this module moves it around
//! with hyper's own HTTP/1 code, in memory and without a socket or a task:
//!
//! - [`request_spellings`] hands a request's extensions to an in-memory HTTP/1 exchange as the
//!   extensions of a response carrying the same `iothub-app-*` names, and reads the names back from
//!   the bytes hyper writes;
//! - [`response_extensions`] has hyper parse an in-memory request head carrying the wanted
//!   spellings and returns the extensions it recorded, for a response to carry.
//!
//! Each exchange is one request and one response through a `tokio::io::duplex` pipe, bounded in size
//! and time; it runs only for requests and responses that carry `iothub-app-*` headers. HTTP/2
//! header names are lower case on the wire by definition, so there is nothing to keep there.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Extensions, HeaderMap, HeaderValue, Request, Response};
use http_body_util::Empty;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The header-name prefix of application properties.
pub const APP_PREFIX: &str = "iothub-app-";

/// Longest head an exchange reads back (a request's headers are bounded by hyper's own limits).
const MAX_HEAD_BYTES: usize = 128 * 1024;
/// How long an exchange may take (it never waits on anything but memory).
const EXCHANGE_DEADLINE: Duration = Duration::from_secs(2);

/// Original spellings of a response's headers, left by a handler for [`response_extensions`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OriginalNames(pub Vec<String>);

/// Whether `headers` has an application-property header.
pub fn has_app_headers(headers: &HeaderMap) -> bool {
    headers.keys().any(|k| k.as_str().starts_with(APP_PREFIX))
}

/// The original spellings of the `iothub-app-*` header names of a request whose (HTTP/1)
/// extensions are `extensions`, in header order; empty when hyper recorded none (HTTP/2).
pub async fn request_spellings(headers: &HeaderMap, extensions: Extensions) -> Vec<String> {
    let mut app = HeaderMap::new();
    for (name, _) in headers.iter().filter(|(k, _)| k.as_str().starts_with(APP_PREFIX)) {
        app.append(name.clone(), HeaderValue::from_static("1"));
    }
    if app.is_empty() {
        return Vec::new();
    }
    let slot = Mutex::new(Some((app, extensions)));
    let respond = move |_: Request<Incoming>| {
        let mut resp = Response::new(Empty::<Bytes>::new());
        if let Some((headers, extensions)) = slot.lock().unwrap_or_else(|p| p.into_inner()).take() {
            *resp.headers_mut() = headers;
            *resp.extensions_mut() = extensions;
        }
        resp
    };
    let Some(head) = exchange(b"GET / HTTP/1.1\r\nhost: case\r\n\r\n".to_vec(), respond).await else {
        return Vec::new();
    };
    header_names(&head)
        .filter(|n| n.len() > APP_PREFIX.len() && n[..APP_PREFIX.len()].eq_ignore_ascii_case(APP_PREFIX))
        .map(str::to_string)
        .collect()
}

/// Extensions that make hyper write the header names in `names` with their spellings (on an
/// HTTP/1 connection); `None` if none of them is a valid header name.
pub async fn response_extensions(names: &[String]) -> Option<Extensions> {
    let mut head = b"GET / HTTP/1.1\r\nhost: case\r\n".to_vec();
    let mut any = false;
    for name in names.iter().filter(|n| http::HeaderName::from_bytes(n.as_bytes()).is_ok()) {
        head.extend_from_slice(name.as_bytes());
        head.extend_from_slice(b": 1\r\n");
        any = true;
    }
    if !any {
        return None;
    }
    head.extend_from_slice(b"\r\n");
    let captured = Arc::new(Mutex::new(None));
    let slot = captured.clone();
    let respond = move |req: Request<Incoming>| {
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(req.into_parts().0.extensions);
        Response::new(Empty::<Bytes>::new())
    };
    exchange(head, respond).await?;
    captured.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// One request/response exchange with hyper's HTTP/1 server (header case preserved) over an
/// in-memory pipe: writes `request`, answers it with `respond`, returns the response head's bytes.
async fn exchange<F>(request: Vec<u8>, respond: F) -> Option<Vec<u8>>
where
    F: Fn(Request<Incoming>) -> Response<Empty<Bytes>>,
{
    let (client, server) = tokio::io::duplex(16 * 1024);
    let service = service_fn(|req| std::future::ready(Ok::<_, Infallible>(respond(req))));
    let conn = http1::Builder::new()
        .preserve_header_case(true)
        .keep_alive(false)
        .serve_connection(TokioIo::new(server), service);
    let client_side = async move {
        let (mut rd, mut wr) = tokio::io::split(client);
        wr.write_all(&request).await.ok()?;
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = rd.read(&mut buf).await.ok()?;
            if n == 0 || head.len() + n > MAX_HEAD_BYTES {
                return None;
            }
            head.extend_from_slice(&buf[..n]);
        }
        Some(head)
    };
    let both = async { tokio::join!(conn, client_side).1 };
    tokio::time::timeout(EXCHANGE_DEADLINE, both).await.ok().flatten()
}

/// The header names of an HTTP/1 message head, as written.
fn header_names(head: &[u8]) -> impl Iterator<Item = &str> {
    let text = std::str::from_utf8(head).unwrap_or_default();
    let headers = text.split("\r\n\r\n").next().unwrap_or_default();
    headers.split("\r\n").skip(1).filter_map(|line| line.split_once(':').map(|(name, _)| name))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parses `head` with hyper (header case preserved), returning the request's headers and
    /// extensions as the real connection would see them.
    async fn parsed(head: &str) -> (HeaderMap, Extensions) {
        let captured = Arc::new(Mutex::new(None));
        let slot = captured.clone();
        exchange(head.as_bytes().to_vec(), move |req: Request<Incoming>| {
            let parts = req.into_parts().0;
            *slot.lock().unwrap() = Some((parts.headers, parts.extensions));
            Response::new(Empty::new())
        })
        .await
        .unwrap();
        let got = captured.lock().unwrap().take();
        got.unwrap()
    }

    #[tokio::test]
    async fn request_header_names_come_back_as_sent() {
        let (headers, ext) = parsed(
            "POST /x HTTP/1.1\r\nHost: h\r\niothub-app-firmwareChannel: beta\r\nIOTHUB-APP-Mode: a\r\n\
             iothub-app-lower: b\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(has_app_headers(&headers));
        let names = request_spellings(&headers, ext).await;
        assert_eq!(names, ["iothub-app-firmwareChannel", "IOTHUB-APP-Mode", "iothub-app-lower"]);
    }

    #[tokio::test]
    async fn without_recorded_spellings_names_stay_lower_case() {
        let (headers, _) = parsed("GET / HTTP/1.1\r\niothub-app-Foo: 1\r\n\r\n").await;
        assert_eq!(request_spellings(&headers, Extensions::new()).await, ["iothub-app-foo"]);
        assert!(request_spellings(&HeaderMap::new(), Extensions::new()).await.is_empty());
    }

    #[tokio::test]
    async fn response_extensions_make_hyper_write_the_spellings() {
        let names = vec!["iothub-app-firmwareChannel".to_string(), "bad name".to_string()];
        let ext = response_extensions(&names).await.unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("iothub-app-firmwarechannel", HeaderValue::from_static("beta"));
        headers.insert("iothub-app-other", HeaderValue::from_static("x"));
        let slot = Mutex::new(Some((headers, ext)));
        let head = exchange(b"GET / HTTP/1.1\r\n\r\n".to_vec(), move |_| {
            let (h, e) = slot.lock().unwrap().take().unwrap();
            let mut resp = Response::new(Empty::new());
            *resp.headers_mut() = h;
            *resp.extensions_mut() = e;
            resp
        })
        .await
        .unwrap();
        let text = String::from_utf8(head).unwrap();
        assert!(text.contains("\r\niothub-app-firmwareChannel: beta\r\n"), "{text}");
        assert!(text.contains("\r\niothub-app-other: x\r\n"), "{text}");
        assert!(response_extensions(&["bad name".to_string()]).await.is_none());
    }
}
