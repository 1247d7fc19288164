//! The benchmark's app: a small HTTP/1.1 server (hyper, one thread) that answers every request
//! with 200 and a 1 KiB body. Prints `listening http=<addr>` first, like the mesh's binaries.
//!
//!     bench-app [ADDR]        (default 127.0.0.1:0)

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::io::Write;

/// The body every request gets.
pub const BODY: &[u8] = &[b'x'; 1024];

fn main() -> anyhow::Result<()> {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:0".into());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(serve(addr))
}

async fn serve(addr: String) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    println!("listening http={}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let body = Bytes::from_static(BODY);
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_request| {
                let body = body.clone();
                async move {
                    let response = hyper::Response::builder()
                        .header("content-type", "application/octet-stream")
                        .body(Full::new(body))
                        .expect("static response");
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
