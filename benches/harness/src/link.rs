//! An emulated data-center link: a UDP relay between the workers and the gateway's QUIC
//! endpoint that holds every datagram for a fixed delay in each direction.
//!
//! This kernel has no `sch_netem` (`CONFIG_NET_SCH_NETEM` is off, and there are no modules),
//! so `tc netem` cannot add the delay; the relay does it in user space instead. Its timers
//! sleep, so each datagram arrives the delay plus the sleep's lateness after it was sent:
//! [`DelayRelay::round_trip`] measures what the link really costs.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::measure::Stats;

/// A datagram in flight: when it may leave, where to, and through which socket.
struct InFlight {
    due: Instant,
    to: Option<SocketAddr>,
    socket: Arc<UdpSocket>,
    bytes: Vec<u8>,
}

/// The relay; it stops when dropped.
pub struct DelayRelay {
    /// Where clients send (the workers dial this instead of the gateway).
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

const POLL: Duration = Duration::from_millis(50);

impl DelayRelay {
    /// Relays datagrams between clients and `upstream`, each way after `delay`.
    pub fn start(upstream: SocketAddr, delay: Duration) -> Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").context("cannot bind the relay")?);
        front.set_read_timeout(Some(POLL))?;
        let addr = front.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let (up_tx, up_rx) = channel::<InFlight>();
        let (down_tx, down_rx) = channel::<InFlight>();
        let mut threads = vec![
            spawn_sender(up_rx, stop.clone()),
            spawn_sender(down_rx, stop.clone()),
        ];
        let front_reader = {
            let (front, stop) = (front.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut backs: HashMap<SocketAddr, Arc<UdpSocket>> = HashMap::new();
                let mut readers = Vec::new();
                let mut buf = vec![0u8; 65_536];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, client)) = front.recv_from(&mut buf) else {
                        continue;
                    };
                    let due = Instant::now() + delay;
                    let back = match backs.get(&client) {
                        Some(b) => b.clone(),
                        None => {
                            // One upstream socket per client, so replies find their way back.
                            let Ok(b) = open_back(upstream) else { continue };
                            readers.push(spawn_back_reader(
                                b.clone(),
                                front.clone(),
                                client,
                                delay,
                                down_tx.clone(),
                                stop.clone(),
                            ));
                            backs.insert(client, b.clone());
                            b
                        }
                    };
                    let packet = InFlight {
                        due,
                        to: None,
                        socket: back,
                        bytes: buf[..n].to_vec(),
                    };
                    if up_tx.send(packet).is_err() {
                        break;
                    }
                }
                for r in readers {
                    let _ = r.join();
                }
            })
        };
        threads.push(front_reader);
        Ok(Self {
            addr,
            stop,
            threads,
        })
    }

    /// Median and p99 of 200 round trips of a small datagram through the relay to an echo
    /// socket: the link's real cost.
    pub fn round_trip(delay: Duration) -> Result<Stats> {
        let echo = UdpSocket::bind("127.0.0.1:0")?;
        echo.set_read_timeout(Some(Duration::from_secs(2)))?;
        let echo_addr = echo.local_addr()?;
        let relay = Self::start(echo_addr, delay)?;
        let echo_thread = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = echo.recv_from(&mut buf) {
                if echo.send_to(&buf[..n], from).is_err() {
                    break;
                }
            }
        });
        let probe = UdpSocket::bind("127.0.0.1:0")?;
        probe.set_read_timeout(Some(Duration::from_secs(2)))?;
        probe.connect(relay.addr)?;
        let mut samples = Vec::with_capacity(200);
        let mut buf = [0u8; 64];
        for i in 0..200u32 {
            let t = Instant::now();
            probe.send(&i.to_le_bytes())?;
            probe
                .recv(&mut buf)
                .context("a probe was lost in the relay")?;
            samples.push(t.elapsed());
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(relay);
        let _ = echo_thread.join();
        Ok(Stats::of(&samples))
    }
}

impl Drop for DelayRelay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn open_back(upstream: SocketAddr) -> std::io::Result<Arc<UdpSocket>> {
    let b = UdpSocket::bind("127.0.0.1:0")?;
    b.connect(upstream)?;
    b.set_read_timeout(Some(POLL))?;
    Ok(Arc::new(b))
}

/// Reads the upstream's replies to one client and queues them for the client.
fn spawn_back_reader(
    back: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    delay: Duration,
    down: Sender<InFlight>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 65_536];
        while !stop.load(Ordering::Relaxed) {
            let Ok(n) = back.recv(&mut buf) else { continue };
            let packet = InFlight {
                due: Instant::now() + delay,
                to: Some(client),
                socket: front.clone(),
                bytes: buf[..n].to_vec(),
            };
            if down.send(packet).is_err() {
                break;
            }
        }
    })
}

/// Sends each queued datagram when it is due. The delay is the same for all, so the queue is
/// in due order and one sleeping thread per direction keeps it.
fn spawn_sender(queue: Receiver<InFlight>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            let packet = match queue.recv_timeout(POLL) {
                Ok(p) => p,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
            };
            let wait = packet.due.saturating_duration_since(Instant::now());
            if !wait.is_zero() {
                std::thread::sleep(wait);
            }
            let _ = match packet.to {
                Some(to) => packet.socket.send_to(&packet.bytes, to),
                None => packet.socket.send(&packet.bytes),
            };
        }
    })
}
