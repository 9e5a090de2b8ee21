//! The client side of `GET /health`: what `iothub-emulator healthcheck` runs inside a container
//! (a `FROM scratch` image has no curl). It owns one short HTTP/1.1 exchange over a blocking
//! socket with a deadline, and the sans-IO check of the answer ([`check_response`]).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The most of the answer read: the status line, headers and `{"status":…,"devices":…}`.
const MAX_RESPONSE_BYTES: usize = 8 * 1024;

/// Why the hub is not healthy, in one line.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// Nothing answered on the port.
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        /// Where the probe dialled.
        addr: SocketAddr,
        /// The cause (refused, unreachable, timed out).
        source: std::io::Error,
    },
    /// The connection broke or stalled mid-exchange.
    #[error("no complete answer from {addr}: {source}")]
    Io {
        /// Where the probe dialled.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// Something answered, but not a healthy hub.
    #[error("{addr} answered {detail}")]
    Unhealthy {
        /// Where the probe dialled.
        addr: SocketAddr,
        /// The status line or what was wrong with the answer.
        detail: String,
    },
}

/// The address a probe dials for a hub bound to `bind` on `port`: loopback when the hub listens on
/// every address (`0.0.0.0` or `::`), else the bound address itself.
pub fn probe_addr(bind: IpAddr, port: u16) -> SocketAddr {
    let ip = match bind {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, port)
}

/// `GET /health` at `addr`; `Ok` only for a `200` whose body says `healthy`. The whole exchange
/// (connect, write, read) must finish within `timeout`.
pub fn probe(addr: SocketAddr, timeout: Duration) -> Result<(), HealthError> {
    let deadline = Instant::now() + timeout;
    let mut stream =
        TcpStream::connect_timeout(&addr, timeout).map_err(|source| HealthError::Connect { addr, source })?;
    let io = |source| HealthError::Io { addr, source };
    let left = || {
        let d = deadline.saturating_duration_since(Instant::now());
        // A zero timeout means "block forever" to the socket API; keep a floor instead.
        Some(d.max(Duration::from_millis(1)))
    };
    stream.set_write_timeout(left()).map_err(io)?;
    let request = format!("GET /health HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut response = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        if Instant::now() >= deadline {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("timed out after {timeout:?}"),
            )));
        }
        stream.set_read_timeout(left()).map_err(io)?;
        let n = stream.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
        if response.len() >= MAX_RESPONSE_BYTES {
            break;
        }
    }
    check_response(&response).map_err(|detail| HealthError::Unhealthy { addr, detail })
}

/// Checks a raw HTTP answer to `GET /health`: status `200` and a body naming `healthy`. The error
/// says what was answered instead.
pub fn check_response(response: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(response);
    let status_line = text.lines().next().unwrap_or("").trim();
    if status_line.is_empty() {
        return Err("nothing (the connection closed without an answer)".into());
    }
    let code = status_line.split_whitespace().nth(1);
    if !status_line.starts_with("HTTP/") || code.is_none() {
        return Err(format!("something that is not HTTP: {status_line:?}"));
    }
    if code != Some("200") {
        return Err(format!("'{status_line}' (not healthy)"));
    }
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    if !body.contains("\"healthy\"") {
        let shown: String = body.trim().chars().take(200).collect();
        return Err(format!("200 without \"healthy\" in its body: {shown:?}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_200_saying_healthy_passes() {
        let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n{\"status\":\"healthy\",\"devices\":0}";
        assert!(check_response(ok).is_ok());
        let starting = b"HTTP/1.1 503 Service Unavailable\r\n\r\n{\"status\":\"starting\"}";
        assert!(check_response(starting).unwrap_err().contains("503"));
        let other = b"HTTP/1.1 200 OK\r\n\r\n<html>some other server</html>";
        assert!(check_response(other).unwrap_err().contains("healthy"));
        assert!(check_response(b"").unwrap_err().contains("closed"));
        assert!(check_response(b"SSH-2.0-OpenSSH\r\n").unwrap_err().contains("not HTTP"));
    }

    #[test]
    fn probes_loopback_when_bound_to_every_address() {
        assert_eq!(probe_addr("0.0.0.0".parse().unwrap(), 8080), "127.0.0.1:8080".parse().unwrap());
        assert_eq!(probe_addr("::".parse().unwrap(), 1), "[::1]:1".parse().unwrap());
        assert_eq!(probe_addr("127.0.0.7".parse().unwrap(), 9), "127.0.0.7:9".parse().unwrap());
    }

    #[test]
    fn nothing_listening_is_a_connect_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err = probe(probe_addr("127.0.0.1".parse().unwrap(), port), Duration::from_secs(2)).unwrap_err();
        assert!(matches!(err, HealthError::Connect { .. }), "{err}");
    }
}
