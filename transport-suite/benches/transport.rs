//! Round trip and throughput of sand's transports, QUIC and TCP with TLS, side by side in one run
//! with a bare quinn echo and a tokio TCP echo.
//!
//! Run: `cargo bench -p sand-transport-suite --bench transport`
//!
//! Everything runs on one current-thread tokio runtime, client and server in one process: on a
//! small VM a wake-up across vCPUs costs tens of microseconds and would drown what is measured.
//! Each transport is measured in several rounds, interleaved with the others, so a noisy moment
//! does not fall on one of them alone; the samples of all rounds are pooled.
//!
//! - Round trip: sand sends a `Heartbeat` (worker to gateway) and the gateway's driver answers
//!   an `Ack`, both on the control stream through the seam; quinn and TCP echo 100 bytes. sand's
//!   payload path (a `Progress` answered by a `Dispatch`, with 100-byte values; on QUIC each on a
//!   stream of its own) is shown too.
//! - Throughput: 64 KiB messages one way, timed until the receiver has them all. sand sends
//!   `Dispatch` messages with 64 KiB inputs (on QUIC a stream each); quinn and TCP write them on
//!   one stream.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use quinn::Endpoint;
use sand_protocol::ids::WorkerId;
use sand_protocol::wire::{encode, Down, ToGateway, Up};
use sand_transport::config::LinkConfig;
use sand_transport::seam::{GatewayEvent, GatewaySender, WorkerEvent, WorkerLink};
use sand_transport::tls::certs::NodeIdentity;
use sand_transport_suite::common::{ack, dispatch, heartbeat, progress, Pki as SuitePki};
use sand_transport_suite::{Quic, Tcp, TestTransport};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

const ROUNDS: usize = 5;
const WARMUP: usize = 1_000;
const SAMPLES_PER_ROUND: usize = 4_000;
const SMALL_BYTES: usize = 100;
const BIG_BYTES: usize = 64 * 1024;
const BIG_COUNT: usize = 1_000;
/// Big messages sent and not yet received, at most: 16 MiB, well inside the default send queue,
/// which a sender must never overflow (that would close the connection).
const BIG_IN_FLIGHT_MAX: usize = 256;

type BoxError = Box<dyn std::error::Error>;

fn main() -> Result<(), BoxError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}

struct Pki {
    cluster: SuitePki,
    worker: NodeIdentity,
}

fn pki() -> Pki {
    let cluster = SuitePki::new();
    let worker = cluster.worker(1);
    Pki { cluster, worker }
}

#[derive(Default)]
struct Results {
    rtt: Vec<Duration>,
    mib_per_s: Vec<f64>,
}

async fn run() -> Result<(), BoxError> {
    let pki = pki();
    let config = LinkConfig::default();
    let mut sand = SandPair::new::<Quic>(&pki, &config).await?;
    let mut sand_tcp = SandPair::new::<Tcp>(&pki, &config).await?;
    let mut bare = Echo::quinn(&pki, &config).await?;
    let mut tcp = Echo::tcp().await?;

    let mut results: [Results; 6] = Default::default();
    for round in 0..ROUNDS {
        let warm = if round == 0 { WARMUP } else { 0 };
        results[0]
            .rtt
            .extend(sand.control_rtt(warm, SAMPLES_PER_ROUND).await?);
        results[1]
            .rtt
            .extend(sand.payload_rtt(warm, SAMPLES_PER_ROUND / 4).await?);
        results[2]
            .rtt
            .extend(sand_tcp.control_rtt(warm, SAMPLES_PER_ROUND).await?);
        results[3]
            .rtt
            .extend(sand_tcp.payload_rtt(warm, SAMPLES_PER_ROUND / 4).await?);
        results[4]
            .rtt
            .extend(bare.rtt(warm, SAMPLES_PER_ROUND).await?);
        results[5]
            .rtt
            .extend(tcp.rtt(warm, SAMPLES_PER_ROUND).await?);
        results[0].mib_per_s.push(sand.throughput(BIG_COUNT).await?);
        results[2]
            .mib_per_s
            .push(sand_tcp.throughput(BIG_COUNT).await?);
        results[4].mib_per_s.push(bare.throughput(BIG_COUNT).await?);
        results[5].mib_per_s.push(tcp.throughput(BIG_COUNT).await?);
    }

    let hb = encode(&Up::from(heartbeat(3)))?.len() + 4;
    let ack = encode(&Down::from(ack(7)))?.len() + 4;
    println!();
    println!(
        "| transport | round trip median (µs) | round trip p99 (µs) | 64 KiB messages (MiB/s) |"
    );
    println!("|---|---|---|---|");
    let names = [
        format!("sand QUIC, control stream (Heartbeat {hb} B → Ack {ack} B, framed)"),
        "sand QUIC, payload path (Progress → Dispatch, 100 B values, a stream each)".to_string(),
        format!("sand TCP+TLS, control (Heartbeat {hb} B → Ack {ack} B, framed)"),
        "sand TCP+TLS, payload path (Progress → Dispatch, 100 B values, one stream)".to_string(),
        format!("bare quinn, one bi stream, {SMALL_BYTES} B echo"),
        format!("tokio TCP loopback (nodelay, no TLS), {SMALL_BYTES} B echo"),
    ];
    let mut medians = [0.0; 6];
    for (i, r) in results.iter_mut().enumerate() {
        r.rtt.sort();
        let median = micros(percentile(&r.rtt, 0.50));
        let p99 = micros(percentile(&r.rtt, 0.99));
        medians[i] = median;
        let tput = if r.mib_per_s.is_empty() {
            "—".to_string()
        } else {
            r.mib_per_s.sort_by(f64::total_cmp);
            format!("{:.0}", r.mib_per_s[r.mib_per_s.len() / 2])
        };
        println!("| {} | {median:.1} | {p99:.1} | {tput} |", names[i]);
    }
    println!();
    println!(
        "sand QUIC / bare quinn, round trip median: {:.2}x (target ≤ 1.20x); sand TCP+TLS / \
         sand QUIC: {:.2}x; {} samples per row ({} for the payload paths) over {ROUNDS} \
         interleaved rounds; throughput is the median of {ROUNDS} runs of {BIG_COUNT} messages.",
        medians[0] / medians[4],
        medians[2] / medians[0],
        ROUNDS * SAMPLES_PER_ROUND,
        ROUNDS * SAMPLES_PER_ROUND / 4,
    );
    Ok(())
}

fn percentile(sorted: &[Duration], q: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// A gateway and a worker over one of sand's transports. The gateway's driver answers a
/// `Heartbeat` with an `Ack` and a `Progress` with a `Dispatch`.
struct SandPair {
    _endpoints: Box<dyn std::any::Any>,
    worker: WorkerLink,
    gateway_sender: GatewaySender,
}

impl SandPair {
    async fn new<T: TestTransport>(pki: &Pki, config: &LinkConfig) -> Result<Self, BoxError> {
        let addr: SocketAddr = "127.0.0.1:0".parse()?;
        let (gateway, mut gw) = T::bind(&pki.cluster, addr, config.clone())?;
        let (worker_ep, mut worker) = T::start_worker(&gateway, &pki.worker, config.clone());
        match worker.events.recv().await {
            Some(WorkerEvent::Connected) => {}
            other => return Err(format!("worker: {other:?}").into()),
        }
        let gateway_sender = gw.sender.clone();
        let reply_ack = ack(7);
        let reply_dispatch = dispatch(1, SMALL_BYTES);
        tokio::spawn(async move {
            while let Some(event) = gw.events.recv().await {
                if let GatewayEvent::Message(w, msg) = event {
                    let reply = match msg {
                        Up::Protocol(ToGateway::Heartbeat { .. }) => reply_ack.clone(),
                        _ => reply_dispatch.clone(),
                    };
                    if gw.sender.send(w, reply).is_err() {
                        break;
                    }
                }
            }
        });
        Ok(Self {
            _endpoints: Box::new((gateway, worker_ep)),
            worker,
            gateway_sender,
        })
    }

    async fn ask(&mut self, msg: ToGateway) -> Result<(), BoxError> {
        self.worker.sender.send(msg)?;
        match self.worker.events.recv().await {
            Some(WorkerEvent::Message(_)) => Ok(()),
            other => Err(format!("worker: {other:?}").into()),
        }
    }

    async fn control_rtt(&mut self, warm: usize, n: usize) -> Result<Vec<Duration>, BoxError> {
        let hb = heartbeat(3);
        for _ in 0..warm {
            self.ask(hb.clone()).await?;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            self.ask(hb.clone()).await?;
            out.push(t.elapsed());
        }
        Ok(out)
    }

    async fn payload_rtt(&mut self, warm: usize, n: usize) -> Result<Vec<Duration>, BoxError> {
        let p = progress(1, SMALL_BYTES);
        for _ in 0..warm {
            self.ask(p.clone()).await?;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            self.ask(p.clone()).await?;
            out.push(t.elapsed());
        }
        Ok(out)
    }

    async fn throughput(&mut self, count: usize) -> Result<f64, BoxError> {
        let msg = dispatch(1, BIG_BYTES);
        let start = Instant::now();
        let (mut sent, mut received) = (0, 0);
        while received < count {
            while sent < count && sent - received < BIG_IN_FLIGHT_MAX {
                self.gateway_sender.send(WorkerId(1), msg.clone())?;
                sent += 1;
            }
            match self.worker.events.recv().await {
                Some(WorkerEvent::Message(_)) => received += 1,
                other => return Err(format!("worker: {other:?}").into()),
            }
        }
        Ok(mib_per_s(count * BIG_BYTES, start.elapsed()))
    }
}

fn mib_per_s(bytes: usize, took: Duration) -> f64 {
    bytes as f64 / (1024.0 * 1024.0) / took.as_secs_f64()
}

/// The echo server on one byte stream: the first byte says what follows, 'e' an echo of
/// SMALL_BYTES, 't' a throughput run of BIG_COUNT messages answered by one byte.
async fn serve_echo<R, W>(mut recv: R, mut send: W)
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut kind = [0u8; 1];
    let mut small = [0u8; SMALL_BYTES];
    let mut big = vec![0u8; BIG_BYTES];
    while recv.read_exact(&mut kind).await.is_ok() {
        if kind[0] == b'e' {
            if recv.read_exact(&mut small).await.is_err() || send.write_all(&small).await.is_err() {
                return;
            }
        } else {
            for _ in 0..BIG_COUNT {
                if recv.read_exact(&mut big).await.is_err() {
                    return;
                }
            }
            if send.write_all(b"k").await.is_err() {
                return;
            }
        }
    }
}

/// A client of [`serve_echo`] on one byte stream: a bare quinn bidirectional stream with the
/// same TLS and transport settings as sand's, or a tokio TCP loopback socket with nodelay.
struct Echo<R, W> {
    recv: R,
    send: W,
    /// The endpoints, kept open.
    _endpoints: Box<dyn std::any::Any>,
}

impl Echo<quinn::RecvStream, quinn::SendStream> {
    async fn quinn(pki: &Pki, config: &LinkConfig) -> Result<Self, BoxError> {
        let server = Endpoint::server(
            sand_transport_quic::server_config(&pki.cluster.gateway, config)?,
            "127.0.0.1:0".parse()?,
        )?;
        let addr = server.local_addr()?;
        let mut client = Endpoint::client("127.0.0.1:0".parse()?)?;
        client.set_default_client_config(sand_transport_quic::client_config(&pki.worker, config)?);
        let accepting = server.clone();
        tokio::spawn(async move {
            let Some(incoming) = accepting.accept().await else {
                return;
            };
            let Ok(conn) = incoming.await else { return };
            if let Ok((send, recv)) = conn.accept_bi().await {
                serve_echo(recv, send).await;
            }
        });
        let conn = client.connect(addr, "localhost")?.await?;
        let (send, recv) = conn.open_bi().await?;
        Ok(Self {
            recv,
            send,
            _endpoints: Box::new((server, client)),
        })
    }
}

impl Echo<OwnedReadHalf, OwnedWriteHalf> {
    async fn tcp() -> Result<Self, BoxError> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(async move {
            let Ok((s, _)) = listener.accept().await else {
                return;
            };
            if s.set_nodelay(true).is_ok() {
                let (recv, send) = s.into_split();
                serve_echo(recv, send).await;
            }
        });
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let (recv, send) = stream.into_split();
        Ok(Self {
            recv,
            send,
            _endpoints: Box::new(()),
        })
    }
}

impl<R: AsyncRead + Unpin, W: AsyncWrite + Unpin> Echo<R, W> {
    async fn rtt(&mut self, warm: usize, n: usize) -> Result<Vec<Duration>, BoxError> {
        let mut msg = [7u8; SMALL_BYTES + 1];
        msg[0] = b'e';
        let mut back = [0u8; SMALL_BYTES];
        let mut out = Vec::with_capacity(n);
        for i in 0..warm + n {
            let t = Instant::now();
            self.send.write_all(&msg).await?;
            self.recv.read_exact(&mut back).await?;
            if i >= warm {
                out.push(t.elapsed());
            }
        }
        Ok(out)
    }

    async fn throughput(&mut self, count: usize) -> Result<f64, BoxError> {
        let big = vec![b'x'; BIG_BYTES];
        let start = Instant::now();
        self.send.write_all(b"t").await?;
        for _ in 0..count {
            self.send.write_all(&big).await?;
        }
        let mut done = [0u8; 1];
        self.recv.read_exact(&mut done).await?;
        Ok(mib_per_s(count * BIG_BYTES, start.elapsed()))
    }
}
