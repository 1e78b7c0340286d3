//! An emulated network link: a UDP relay between a worker and the gateway's QUIC endpoint that
//! holds every datagram for a fixed delay in each direction, and on demand drops, delays and
//! reorders datagrams, or cuts the link altogether.
//!
//! This kernel has no `sch_netem` (`CONFIG_NET_SCH_NETEM` is off, and there are no modules),
//! so `tc netem` cannot do this; the relay does it in user space instead. Its timer sleeps, so
//! each datagram arrives the delay plus the sleep's lateness after it was sent:
//! [`Relay::round_trip`] measures what the link really costs.
//!
//! Each client address (a worker's UDP socket) gets its own upstream socket, so replies find
//! their way back; a worker started again comes from a new port and gets a new one. An
//! upstream socket that has heard nothing for [`CLIENT_IDLE`] is closed.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::stats::Latencies;

/// What the link does to datagrams, besides its fixed delay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Weather {
    /// Every datagram passes.
    Clear,
    /// Each datagram is dropped with probability `drop`, and otherwise held an extra time
    /// drawn uniformly up to `jitter`, so that datagrams overtake each other.
    Lossy {
        /// The probability that a datagram is dropped.
        drop: f64,
        /// The longest extra delay.
        jitter: Duration,
    },
    /// Every datagram is dropped.
    Partitioned,
}

/// How long an upstream socket lives without hearing from the upstream.
pub const CLIENT_IDLE: Duration = Duration::from_secs(30);

/// How often the relay's threads look up from a socket or queue to see whether to stop.
const POLL: Duration = Duration::from_millis(50);

/// The relay; it stops when dropped.
pub struct Relay {
    /// Where clients send (a worker dials this instead of the gateway).
    pub addr: SocketAddr,
    weather: Arc<Mutex<Weather>>,
    dropped: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// What the relay's threads share.
#[derive(Clone)]
struct Shared {
    upstream: SocketAddr,
    delay: Duration,
    front: Arc<UdpSocket>,
    weather: Arc<Mutex<Weather>>,
    dropped: Arc<AtomicU64>,
    /// Datagrams queued so far: the next one's `seq`.
    sent: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    queue: Sender<InFlight>,
    /// The upstream socket of each client.
    backs: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>>,
}

/// A datagram in flight: when it may leave, where to, and through which socket.
struct InFlight {
    due: Instant,
    /// Breaks ties in `due`, so that datagrams due at once leave in the order they came.
    seq: u64,
    to: Option<SocketAddr>,
    socket: Arc<UdpSocket>,
    bytes: Vec<u8>,
}

impl Ord for InFlight {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

impl PartialOrd for InFlight {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for InFlight {
    fn eq(&self, other: &Self) -> bool {
        self.seq == other.seq
    }
}

impl Eq for InFlight {}

impl Relay {
    /// Relays datagrams between clients and `upstream`, each way after `delay`; `seed` seeds
    /// the draws of lossy weather.
    pub fn start(upstream: SocketAddr, delay: Duration, seed: u64) -> Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").context("cannot bind the relay")?);
        front.set_read_timeout(Some(POLL))?;
        let addr = front.local_addr()?;
        let (queue, due) = channel();
        let shared = Shared {
            upstream,
            delay,
            front,
            weather: Arc::new(Mutex::new(Weather::Clear)),
            dropped: Arc::new(AtomicU64::new(0)),
            sent: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            queue,
            backs: Arc::new(Mutex::new(HashMap::new())),
        };
        let sender = {
            let stop = shared.stop.clone();
            std::thread::spawn(move || send_when_due(due, &stop))
        };
        let front_reader = {
            let shared = shared.clone();
            std::thread::spawn(move || relay_clients(&shared, seed))
        };
        Ok(Self {
            addr,
            weather: shared.weather,
            dropped: shared.dropped,
            stop: shared.stop,
            threads: vec![sender, front_reader],
        })
    }

    /// Changes what the link does to the datagrams that reach it from now on.
    pub fn set_weather(&self, weather: Weather) {
        *lock(&self.weather) = weather;
    }

    /// Datagrams dropped so far, both ways.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The times of 200 round trips of a small datagram through the relay to an echo socket:
    /// what the link really costs.
    pub fn round_trip(delay: Duration) -> Result<Latencies> {
        let echo = UdpSocket::bind("127.0.0.1:0")?;
        echo.set_read_timeout(Some(Duration::from_secs(2)))?;
        let echo_addr = echo.local_addr()?;
        let relay = Self::start(echo_addr, delay, 0)?;
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
        Ok(samples.into_iter().collect())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Shared {
    /// When a datagram that arrived now leaves, or None if the weather drops it.
    fn fate(&self, rng: &mut StdRng) -> Option<Instant> {
        let extra = match *lock(&self.weather) {
            Weather::Clear => Duration::ZERO,
            Weather::Lossy { drop, jitter } if !rng.random_bool(drop.clamp(0.0, 1.0)) => {
                Duration::from_micros(rng.random_range(0..=jitter.as_micros() as u64))
            }
            Weather::Lossy { .. } | Weather::Partitioned => return None,
        };
        Some(Instant::now() + self.delay + extra)
    }

    /// Queues a datagram, or counts it dropped; false once the sender is gone.
    fn forward(
        &self,
        rng: &mut StdRng,
        to: Option<SocketAddr>,
        socket: &Arc<UdpSocket>,
        bytes: &[u8],
    ) -> bool {
        let Some(due) = self.fate(rng) else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return true;
        };
        let packet = InFlight {
            due,
            seq: self.sent.fetch_add(1, Ordering::Relaxed),
            to,
            socket: socket.clone(),
            bytes: bytes.to_vec(),
        };
        self.queue.send(packet).is_ok()
    }

    /// The upstream socket of `client`, made (with its reader) on its first datagram.
    fn back(
        &self,
        client: SocketAddr,
        readers: &mut Vec<JoinHandle<()>>,
        seed: u64,
    ) -> Option<Arc<UdpSocket>> {
        let mut backs = lock(&self.backs);
        if let Some(back) = backs.get(&client) {
            return Some(back.clone());
        }
        let back = open_back(self.upstream).ok()?;
        backs.insert(client, back.clone());
        let (shared, reader) = (self.clone(), back.clone());
        let seed = seed.wrapping_add(readers.len() as u64 + 1);
        readers.push(std::thread::spawn(move || {
            relay_upstream(&shared, &reader, client, seed)
        }));
        Some(back)
    }
}

/// Reads the clients' datagrams and queues each for the upstream, through the client's own
/// upstream socket.
fn relay_clients(shared: &Shared, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut readers = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while !shared.stop.load(Ordering::Relaxed) {
        let Ok((n, client)) = shared.front.recv_from(&mut buf) else {
            continue;
        };
        let Some(back) = shared.back(client, &mut readers, seed) else {
            continue;
        };
        if !shared.forward(&mut rng, None, &back, &buf[..n]) {
            break;
        }
        readers.retain(|r: &JoinHandle<()>| !r.is_finished());
    }
    for r in readers {
        let _ = r.join();
    }
}

/// Reads the upstream's datagrams to one client and queues each for the client, until the
/// upstream has been silent for [`CLIENT_IDLE`].
fn relay_upstream(shared: &Shared, back: &Arc<UdpSocket>, client: SocketAddr, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; 65_536];
    let mut heard = Instant::now();
    while !shared.stop.load(Ordering::Relaxed) {
        let Ok(n) = back.recv(&mut buf) else {
            if heard.elapsed() > CLIENT_IDLE {
                lock(&shared.backs).remove(&client);
                return;
            }
            continue;
        };
        heard = Instant::now();
        if !shared.forward(&mut rng, Some(client), &shared.front, &buf[..n]) {
            return;
        }
    }
}

fn open_back(upstream: SocketAddr) -> std::io::Result<Arc<UdpSocket>> {
    let b = UdpSocket::bind("127.0.0.1:0")?;
    b.connect(upstream)?;
    b.set_read_timeout(Some(POLL))?;
    Ok(Arc::new(b))
}

/// Sends each queued datagram when it is due, earliest first.
fn send_when_due(queue: Receiver<InFlight>, stop: &AtomicBool) {
    let mut waiting: BinaryHeap<Reverse<InFlight>> = BinaryHeap::new();
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        while waiting.peek().is_some_and(|Reverse(p)| p.due <= now) {
            let Some(Reverse(p)) = waiting.pop() else {
                break;
            };
            let _ = match p.to {
                Some(to) => p.socket.send_to(&p.bytes, to),
                None => p.socket.send(&p.bytes),
            };
        }
        let wait = waiting.peek().map_or(POLL, |Reverse(p)| {
            p.due.saturating_duration_since(now).min(POLL)
        });
        match queue.recv_timeout(wait) {
            Ok(p) => waiting.push(Reverse(p)),
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo socket behind a relay, and a client socket in front of it.
    fn echo_behind(relay_delay: Duration) -> (Relay, UdpSocket, JoinHandle<()>) {
        let echo = UdpSocket::bind("127.0.0.1:0").expect("bind");
        echo.set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let relay = Relay::start(echo.local_addr().expect("addr"), relay_delay, 7).expect("relay");
        let echo_thread = std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = echo.recv_from(&mut buf) {
                let _ = echo.send_to(&buf[..n], from);
            }
        });
        let client = UdpSocket::bind("127.0.0.1:0").expect("bind");
        client
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        client.connect(relay.addr).expect("connect");
        (relay, client, echo_thread)
    }

    /// Sends `n` numbered datagrams and returns the numbers that came back, in arrival order.
    fn bounce(client: &UdpSocket, n: u32) -> Vec<u32> {
        for i in 0..n {
            client.send(&i.to_le_bytes()).expect("send");
        }
        let mut back = Vec::new();
        let mut buf = [0u8; 4];
        while let Ok(4) = client.recv(&mut buf) {
            back.push(u32::from_le_bytes(buf));
        }
        back
    }

    #[test]
    fn weather_drops_reorders_and_cuts_datagrams_and_clears() {
        let (relay, client, echo) = echo_behind(Duration::ZERO);
        assert_eq!(bounce(&client, 50), (0..50).collect::<Vec<_>>());

        relay.set_weather(Weather::Lossy {
            drop: 0.3,
            jitter: Duration::from_millis(20),
        });
        let lossy = bounce(&client, 200);
        assert!(lossy.len() < 190, "{} of 200 came back", lossy.len());
        assert!(lossy.len() > 20, "{} of 200 came back", lossy.len());
        assert!(lossy.windows(2).any(|w| w[0] > w[1]), "no reordering");

        relay.set_weather(Weather::Partitioned);
        assert_eq!(bounce(&client, 20), Vec::<u32>::new());
        assert!(relay.dropped() >= 20 + 200 - lossy.len() as u64);

        relay.set_weather(Weather::Clear);
        assert_eq!(bounce(&client, 20), (0..20).collect::<Vec<_>>());
        drop(relay);
        drop(client);
        let _ = echo.join();
    }

    #[test]
    fn a_new_client_port_gets_its_own_way_back() {
        let (relay, first, echo) = echo_behind(Duration::from_millis(1));
        assert_eq!(bounce(&first, 3), vec![0, 1, 2]);
        let second = UdpSocket::bind("127.0.0.1:0").expect("bind");
        second
            .set_read_timeout(Some(Duration::from_millis(500)))
            .expect("timeout");
        second.connect(relay.addr).expect("connect");
        assert_eq!(bounce(&second, 3), vec![0, 1, 2]);
        assert_eq!(bounce(&first, 1), vec![0]);
        drop(relay);
        let _ = echo.join();
    }
}
