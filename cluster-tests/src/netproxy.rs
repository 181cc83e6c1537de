//! A user-space fault proxy for one directed link between two nodes.
//!
//! Node A reaches node B through `LinkProxy(A→B)` (tallyd's `--peer-route`),
//! so the test can cut, delay or blackhole exactly that link while the rest
//! of the network works. Real TCP traffic flows through it; faults act on
//! live connections too:
//! * `Pass` forwards bytes;
//! * `Delay(d)` holds every chunk for `d` before forwarding;
//! * `Drop` resets existing connections and refuses new ones;
//! * `Blackhole` accepts and reads, but forwards nothing (a silent network).

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkMode {
    Pass,
    Delay(Duration),
    Drop,
    Blackhole,
}

pub struct LinkProxy {
    pub listen_addr: String,
    mode: Arc<watch::Sender<LinkMode>>,
    task: tokio::task::JoinHandle<()>,
}

impl LinkProxy {
    pub async fn start(target_addr: String) -> anyhow::Result<LinkProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let listen_addr = listener.local_addr()?.to_string();
        let (tx, _) = watch::channel(LinkMode::Pass);
        let mode = Arc::new(tx);
        let task = tokio::spawn(accept_loop(listener, target_addr, mode.clone()));
        Ok(LinkProxy { listen_addr, mode, task })
    }

    pub fn set(&self, mode: LinkMode) {
        self.mode.send_replace(mode);
    }

    pub fn mode(&self) -> LinkMode {
        *self.mode.borrow()
    }
}

impl Drop for LinkProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(listener: TcpListener, target: String, mode: Arc<watch::Sender<LinkMode>>) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else { continue };
        if *mode.borrow() == LinkMode::Drop {
            drop(inbound);
            continue;
        }
        let target = target.clone();
        let rx = mode.subscribe();
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(&target).await else { return };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            let a = tokio::spawn(pump(ri, wo, rx.clone()));
            let b = tokio::spawn(pump(ro, wi, rx));
            let _ = tokio::join!(a, b);
        });
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut mode: watch::Receiver<LinkMode>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            changed = mode.changed() => {
                if changed.is_err() || *mode.borrow() == LinkMode::Drop {
                    return; // dropping both halves resets the connection
                }
                continue;
            }
        };
        let current = *mode.borrow();
        match current {
            LinkMode::Pass => {}
            LinkMode::Delay(d) => tokio::time::sleep(d).await,
            LinkMode::Blackhole => continue,
            LinkMode::Drop => return,
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn modes_act_on_real_traffic() -> anyhow::Result<()> {
        let echo = TcpListener::bind("127.0.0.1:0").await?;
        let echo_addr = echo.local_addr()?.to_string();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let mut b = [0u8; 1024];
                    while let Ok(n) = s.read(&mut b).await {
                        if n == 0 || s.write_all(&b[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        let proxy = LinkProxy::start(echo_addr).await?;
        let mut c = TcpStream::connect(&proxy.listen_addr).await?;
        c.write_all(b"ping").await?;
        let mut b = [0u8; 4];
        c.read_exact(&mut b).await?;
        assert_eq!(&b, b"ping");

        proxy.set(LinkMode::Blackhole);
        c.write_all(b"lost").await?;
        let silent = tokio::time::timeout(Duration::from_millis(200), c.read(&mut b)).await;
        assert!(silent.is_err(), "blackhole forwards nothing");

        proxy.set(LinkMode::Drop);
        let closed = tokio::time::timeout(Duration::from_secs(2), c.read(&mut b)).await?;
        assert!(matches!(closed, Ok(0) | Err(_)), "drop cuts live connections");
        let mut d = TcpStream::connect(&proxy.listen_addr).await?;
        let refused = tokio::time::timeout(Duration::from_secs(2), d.read(&mut b)).await?;
        assert!(matches!(refused, Ok(0) | Err(_)), "drop refuses new connections");

        proxy.set(LinkMode::Pass);
        let mut e = TcpStream::connect(&proxy.listen_addr).await?;
        e.write_all(b"back").await?;
        e.read_exact(&mut b).await?;
        assert_eq!(&b, b"back");
        Ok(())
    }
}
