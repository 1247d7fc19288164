//! Accepting connections on the control plane's two ports, with limits.
//!
//! tonic and hyper bound what a connection may do once it speaks HTTP, but nothing there
//! bounds a connection that never does: thousands of TCP connections that send nothing would
//! each hold a socket and a task forever. So each port accepts in its own loop here:
//!
//! - at most `max_connections` are open per port; past it a new connection is closed at once
//!   (rather than left in the kernel's accept queue, where it would wait unserved);
//! - a gRPC connection must send the whole HTTP/2 client preface within the handshake
//!   timeout, or it is closed. Only vetted connections reach tonic (through a channel), so a
//!   slow one never delays the next. After the preface, HTTP/2 keep-alive pings find peers
//!   that stopped answering.
//!
//! The HTTP port gets the same deadline from hyper's header-read timeout ([`crate::http`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// What every HTTP/2 client sends first (RFC 9113, section 3.4).
pub const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The limits of one port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Open connections at most (including those still in their handshake).
    pub max_connections: usize,
    /// How long a new connection may take to send its HTTP/2 preface (gRPC) or a request's
    /// headers (HTTP).
    pub handshake_timeout: Duration,
}

/// An accepted TCP connection holding its place in its port's count until dropped.
#[derive(Debug)]
pub struct Counted {
    stream: TcpStream,
    permit: OwnedSemaphorePermit,
}

impl Counted {
    /// The stream, and the permit that must live as long as the connection.
    pub fn into_parts(self) -> (TcpStream, OwnedSemaphorePermit) {
        (self.stream, self.permit)
    }
}

/// Accepts on `listener` until `shutdown`, handing each connection within the limit to
/// `handle`; a connection past the limit is closed at once.
pub async fn accept_loop(
    listener: TcpListener,
    max_connections: usize,
    port: &'static str,
    mut shutdown: watch::Receiver<bool>,
    mut handle: impl FnMut(Counted) + Send,
) {
    let open = Arc::new(Semaphore::new(max_connections));
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors, most likely: wait for some to close.
                    tracing::warn!("{port} accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        match open.clone().try_acquire_owned() {
            Ok(permit) => handle(Counted { stream, permit }),
            Err(_) => {
                metrics::counter!(crate::metrics::CONNECTIONS_REFUSED, "port" => port).increment(1);
                tracing::debug!(%peer, "{port}: {max_connections} connections open; closing a new one");
            }
        }
    }
}

/// The gRPC port's connections, vetted: each has sent the HTTP/2 preface in time. For
/// `serve_with_incoming_shutdown`; the accept loop stops with `shutdown`.
pub fn grpc_incoming(
    listener: TcpListener,
    limits: Limits,
    shutdown: watch::Receiver<bool>,
) -> ReceiverStream<io::Result<Vetted>> {
    let (tx, rx) = mpsc::channel(64);
    let timeout = limits.handshake_timeout;
    tokio::spawn(accept_loop(
        listener,
        limits.max_connections,
        "grpc",
        shutdown,
        move |conn| {
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Some(vetted) = vet(conn, timeout).await {
                    let _ = tx.send(Ok(vetted)).await;
                }
            });
        },
    ));
    ReceiverStream::new(rx)
}

/// Reads the HTTP/2 preface within `timeout`; `None` (the connection is closed) if it does
/// not come, or is not the preface.
async fn vet(mut conn: Counted, timeout: Duration) -> Option<Vetted> {
    let _ = conn.stream.set_nodelay(true);
    let mut preface = [0u8; H2_PREFACE.len()];
    match tokio::time::timeout(timeout, conn.stream.read_exact(&mut preface)).await {
        Ok(Ok(_)) if &preface == H2_PREFACE => Some(Vetted { conn, replayed: 0 }),
        Ok(Ok(_)) => {
            tracing::debug!("grpc: a connection did not start with the HTTP/2 preface; closed");
            None
        }
        Ok(Err(e)) => {
            tracing::debug!("grpc: a connection closed before its HTTP/2 preface: {e}");
            None
        }
        Err(_) => {
            metrics::counter!(crate::metrics::HANDSHAKE_TIMEOUTS).increment(1);
            tracing::debug!("grpc: no HTTP/2 preface within {timeout:?}; connection closed");
            None
        }
    }
}

/// A gRPC connection whose preface was read (and checked); it is replayed to the server
/// before the rest of the stream.
#[derive(Debug)]
pub struct Vetted {
    conn: Counted,
    replayed: usize,
}

impl AsyncRead for Vetted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replayed < H2_PREFACE.len() {
            let rest = &H2_PREFACE[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.conn.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Vetted {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().conn.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().conn.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.conn.stream.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().conn.stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().conn.stream).poll_shutdown(cx)
    }
}

impl Connected for Vetted {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.conn.stream.connect_info()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    type Port = (
        std::net::SocketAddr,
        ReceiverStream<io::Result<Vetted>>,
        watch::Sender<bool>,
    );

    async fn port(limits: Limits) -> Port {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, rx) = watch::channel(false);
        (addr, grpc_incoming(listener, limits, rx), stop)
    }

    #[tokio::test]
    async fn the_preface_is_replayed_and_silence_is_closed() {
        use futures_util::StreamExt;
        let limits = Limits {
            max_connections: 2,
            handshake_timeout: Duration::from_millis(200),
        };
        let (addr, mut incoming, _stop) = port(limits).await;
        // Silent: closed by the server after the timeout.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut byte)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "a silent connection is closed: {read:?}"
        );
        // A client that sends the preface reaches the server with its bytes intact.
        let mut client = TcpStream::connect(addr).await.unwrap();
        client.write_all(H2_PREFACE).await.unwrap();
        client.write_all(b"rest").await.unwrap();
        let mut vetted = tokio::time::timeout(Duration::from_secs(5), incoming.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let mut got = vec![0u8; H2_PREFACE.len() + 4];
        vetted.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..24], H2_PREFACE);
        assert_eq!(&got[24..], b"rest");
        // Something else than the preface is closed at once.
        let mut http1 = TcpStream::connect(addr).await.unwrap();
        http1
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
            .await
            .unwrap();
        let read = tokio::time::timeout(Duration::from_secs(5), http1.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    }

    #[tokio::test]
    async fn connections_past_the_limit_are_closed() {
        let limits = Limits {
            max_connections: 1,
            handshake_timeout: Duration::from_secs(30),
        };
        let (addr, _incoming, _stop) = port(limits).await;
        let _first = TcpStream::connect(addr).await.unwrap();
        // Let the first be accepted before the second arrives.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut second = TcpStream::connect(addr).await.unwrap();
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), second.read(&mut byte)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    }
}
