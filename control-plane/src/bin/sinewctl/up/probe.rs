//! Reading what a component reports, and asking whether it is ready: the `listening ...`
//! line on its stdout, its admin `/ready`, its app port.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Parses `listening grpc=127.0.0.1:7700 http=127.0.0.1:7701` into its key=value pairs;
/// `None` for any other line.
pub fn parse_listening(line: &str) -> Option<BTreeMap<String, String>> {
    let rest = line.trim().strip_prefix("listening ")?;
    let mut pairs = BTreeMap::new();
    for word in rest.split_whitespace() {
        let (key, value) = word.split_once('=')?;
        pairs.insert(key.to_string(), value.to_string());
    }
    Some(pairs)
}

/// The address named `key` in a listening line's pairs.
pub fn addr(pairs: &BTreeMap<String, String>, key: &str) -> Result<SocketAddr, String> {
    let text = pairs
        .get(key)
        .ok_or_else(|| format!("its listening line has no {key}="))?;
    text.parse()
        .map_err(|_| format!("its listening line has {key}={text}, not an address"))
}

/// Where to connect to reach a listener bound to `addr`: an unspecified IP (0.0.0.0, ::)
/// becomes loopback.
pub fn dialable(addr: SocketAddr) -> SocketAddr {
    let mut addr = addr;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    addr
}

/// `GET path` over HTTP/1.1; the response status, or why there is none.
pub async fn http_status(addr: SocketAddr, path: &str) -> Result<u16, String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut head = Vec::new();
        let mut buf = [0u8; 256];
        while !head.contains(&b'\n') && head.len() < 4096 {
            let n = stream.read(&mut buf).await.map_err(|e| e.to_string())?;
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        parse_status_line(&head).ok_or_else(|| "no HTTP response".to_string())
    };
    timeout(Duration::from_secs(2), exchange)
        .await
        .unwrap_or_else(|_| Err("no answer within 2s".into()))
}

fn parse_status_line(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut words = line.split_whitespace();
    if !words.next()?.starts_with("HTTP/") {
        return None;
    }
    words.next()?.parse().ok()
}

/// Whether something accepts TCP connections on `addr`.
pub async fn accepts(addr: SocketAddr) -> Result<(), String> {
    match timeout(Duration::from_secs(2), TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 2s".into()),
    }
}

/// A free port on 127.0.0.1 (bound, then released for the app to take).
pub fn free_port() -> std::io::Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listening_lines() {
        let pairs = parse_listening("listening grpc=127.0.0.1:7700 http=0.0.0.0:7701\n").unwrap();
        assert_eq!(addr(&pairs, "grpc"), Ok("127.0.0.1:7700".parse().unwrap()));
        assert_eq!(
            dialable(addr(&pairs, "http").unwrap()),
            "127.0.0.1:7701".parse().unwrap()
        );
        assert!(addr(&pairs, "admin").unwrap_err().contains("no admin="));
        let pairs = parse_listening("listening outbound=x").unwrap();
        assert!(
            addr(&pairs, "outbound")
                .unwrap_err()
                .contains("not an address")
        );
        assert!(parse_listening("2025-01-01 INFO starting").is_none());
        assert!(parse_listening("listening on port 5").is_none());
        assert_eq!(
            dialable("[::]:5".parse().unwrap()),
            "[::1]:5".parse().unwrap()
        );
    }

    #[test]
    fn status_lines() {
        assert_eq!(
            parse_status_line(b"HTTP/1.1 503 Service Unavailable\r\n"),
            Some(503)
        );
        assert_eq!(parse_status_line(b"HTTP/1.0 200 OK\r\nx: y"), Some(200));
        assert_eq!(parse_status_line(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status_line(b""), None);
    }

    #[tokio::test]
    async fn http_status_over_a_socket() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 512];
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                .await;
        });
        assert_eq!(http_status(addr, "/ready").await, Ok(200));
        assert!(
            accepts(SocketAddr::from(([127, 0, 0, 1], free_port().unwrap())))
                .await
                .is_err()
        );
    }
}
