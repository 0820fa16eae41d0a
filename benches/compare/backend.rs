//! The plaintext backend behind all three proxies, in-process on loopback.
//! The first byte a client sends through the proxy picks what it does:
//!
//! - `E`: echo everything back (handshake, idle and latency workloads);
//! - `D` + u64 LE length: send that many bytes, then wait for the close;
//! - `U` + u64 LE length: read that many bytes, answer `K`, wait for the close.
//!
//! Lengths make the workloads independent of half-close support (nginx
//! stream closes both sides when one does unless `proxy_half_close` is on).

use std::io;
use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

static ZEROS: [u8; 256 * 1024] = [0; 256 * 1024];

pub struct Backend {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn start() -> io::Result<Backend> {
    let sock = tokio::net::TcpSocket::new_v4()?;
    sock.set_reuseaddr(true)?;
    sock.bind("127.0.0.1:0".parse().expect("literal address"))?;
    let listener: TcpListener = sock.listen(4096)?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((s, _)) => {
                    tokio::spawn(async move {
                        let _ = serve(s).await;
                    });
                }
                // out of descriptors: back off rather than spin
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    });
    Ok(Backend { addr, task })
}

async fn drain_until_close(s: &mut TcpStream) {
    let mut buf = [0u8; 512];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

async fn serve(mut s: TcpStream) -> io::Result<()> {
    s.set_nodelay(true)?;
    let mut cmd = [0u8; 1];
    s.read_exact(&mut cmd).await?;
    match cmd[0] {
        b'E' => {
            // Small: thousands of idle sessions hold one of these each.
            let mut buf = vec![0u8; 2048];
            loop {
                let n = s.read(&mut buf).await?;
                if n == 0 {
                    return s.shutdown().await;
                }
                s.write_all(&buf[..n]).await?;
            }
        }
        b'D' => {
            let mut len = s.read_u64_le().await?;
            while len > 0 {
                let n = len.min(ZEROS.len() as u64) as usize;
                s.write_all(&ZEROS[..n]).await?;
                len -= n as u64;
            }
            drain_until_close(&mut s).await;
            Ok(())
        }
        b'U' => {
            let mut len = s.read_u64_le().await?;
            let mut buf = vec![0u8; 256 * 1024];
            while len > 0 {
                let want = len.min(buf.len() as u64) as usize;
                let n = s.read(&mut buf[..want]).await?;
                if n == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                len -= n as u64;
            }
            s.write_all(b"K").await?;
            drain_until_close(&mut s).await;
            Ok(())
        }
        _ => Ok(()),
    }
}
