//! Destination safety (spec §5): resolve a name once, judge every address it yields, and dial
//! exactly an address that was judged — never a second lookup that DNS rebinding could change.
//!
//! [`classify`] is the pure address classifier; [`NetworkPolicy`] adds the operator's exceptions;
//! [`Dialer`] does the I/O (static overrides, system resolver, TCP connect with a deadline).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ipnet::IpNet;
use tokio::net::TcpStream;

use crate::policy::Host;

/// Why an address may not be dialled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prohibited {
    /// 0.0.0.0/8, `::`.
    Unspecified,
    /// 127.0.0.0/8, `::1`.
    Loopback,
    /// RFC 1918, IPv6 ULA (fc00::/7), site-local, local-use NAT64.
    Private,
    /// 169.254.0.0/16, fe80::/10.
    LinkLocal,
    /// 100.64.0.0/10.
    Cgnat,
    /// 224.0.0.0/4, ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
    /// 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32, 3fff::/20.
    Documentation,
    /// 198.18.0.0/15, 2001:2::/48.
    Benchmarking,
    /// 169.254.169.254, fd00:ec2::254.
    CloudMetadata,
    /// Other IANA special-purpose space: 192.0.0.0/24, 192.88.99.0/24, 240.0.0.0/4, 100::/64.
    Reserved,
    /// Listed in `network.deny_cidrs`.
    DenyListed,
    /// One of the proxy's own listeners.
    OwnListener,
}

impl fmt::Display for Prohibited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Unspecified => "unspecified address",
            Self::Loopback => "loopback",
            Self::Private => "private network",
            Self::LinkLocal => "link-local",
            Self::Cgnat => "carrier-grade NAT range",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::Documentation => "documentation range",
            Self::Benchmarking => "benchmarking range",
            Self::CloudMetadata => "cloud metadata endpoint",
            Self::Reserved => "reserved range",
            Self::DenyListed => "listed in network.deny_cidrs",
            Self::OwnListener => "the proxy's own listener",
        })
    }
}

/// Classifies an address against the special-purpose ranges of spec §5. `None` = public.
/// IPv6 forms that embed an IPv4 address (mapped, compatible, NAT64, 6to4, Teredo) are judged
/// by the IPv4 address they carry.
pub fn classify(ip: IpAddr) -> Option<Prohibited> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<Prohibited> {
    let [a, b, c, d] = ip.octets();
    use Prohibited::*;
    Some(match (a, b, c, d) {
        (169, 254, 169, 254) => CloudMetadata,
        (255, 255, 255, 255) => Broadcast,
        (0, ..) => Unspecified,
        (127, ..) => Loopback,
        (10, ..) | (192, 168, ..) => Private,
        (172, b, ..) if (16..32).contains(&b) => Private,
        (169, 254, ..) => LinkLocal,
        (100, b, ..) if (64..128).contains(&b) => Cgnat,
        (192, 0, 2, _) | (198, 51, 100, _) | (203, 0, 113, _) => Documentation,
        (198, 18 | 19, ..) => Benchmarking,
        (224..=239, ..) => Multicast,
        (192, 0, 0, _) | (192, 88, 99, _) | (240..=255, ..) => Reserved,
        _ => return None,
    })
}

fn classify_v6(ip: Ipv6Addr) -> Option<Prohibited> {
    use Prohibited::*;
    let seg = ip.segments();
    let bits = u128::from(ip);
    let in_net = |prefix: u128, len: u32| bits >> (128 - len) == prefix >> (128 - len);
    let v4_at = |shift: u32| Ipv4Addr::from(((bits >> shift) & 0xffff_ffff) as u32);

    if ip == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254) {
        return Some(CloudMetadata);
    }
    if ip.is_unspecified() {
        return Some(Unspecified);
    }
    if ip.is_loopback() {
        return Some(Loopback);
    }
    // ::ffff:a.b.c.d (mapped) and ::a.b.c.d (compatible, deprecated): the low 32 bits.
    if in_net(0xffff_0000_0000, 96) || in_net(0, 96) {
        return classify_v4(v4_at(0));
    }
    // NAT64 well-known prefix 64:ff9b::/96.
    if in_net(0x0064_ff9b << 96, 96) {
        return classify_v4(v4_at(0));
    }
    // 6to4 2002:V4ADDR::/48.
    if seg[0] == 0x2002 {
        return classify_v4(v4_at(80));
    }
    // Teredo 2001:0::/32: server IPv4 in bits 64..96, client IPv4 (inverted) in the low 32 bits.
    if seg[0] == 0x2001 && seg[1] == 0 {
        let server = classify_v4(v4_at(64));
        let client = classify_v4(Ipv4Addr::from(!((bits & 0xffff_ffff) as u32)));
        return client.or(server);
    }
    Some(match seg[0] {
        _ if in_net(0x0064_ff9b_0001 << 80, 48) => Private,
        0xfc00..=0xfdff => Private,
        0xfec0..=0xfeff => Private,
        0xfe80..=0xfebf => LinkLocal,
        0xff00..=0xffff => Multicast,
        0x2001 if seg[1] == 0x0db8 => Documentation,
        0x3fff if seg[1] < 0x1000 => Documentation,
        0x2001 if seg[1] == 0x0002 && seg[2] == 0 => Benchmarking,
        0x0100 if seg[1] == 0 && seg[2] == 0 && seg[3] == 0 => Reserved,
        _ => return None,
    })
}

/// The operator's network settings, compiled: exceptions, deny list and static names.
#[derive(Debug, Clone, Default)]
pub struct NetworkPolicy {
    /// `network.allow_private`.
    pub allow_private: bool,
    /// `network.allow_cidrs`.
    pub allow: Vec<IpNet>,
    /// `network.deny_cidrs`.
    pub deny: Vec<IpNet>,
    /// `network.resolve`, keyed by normalised name.
    pub resolve: HashMap<String, Vec<IpAddr>>,
}

impl NetworkPolicy {
    /// Judges one address: unspecified addresses and the proxy's own listeners always refused
    /// (whatever `allow_private` or `allow_cidrs` say), then the deny list, then the exceptions,
    /// then the special-purpose ranges.
    pub fn check(&self, addr: SocketAddr, own: &[SocketAddr]) -> Result<(), Prohibited> {
        let ip = canonical(addr.ip());
        if is_unspecified(ip) {
            return Err(Prohibited::Unspecified);
        }
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return Err(Prohibited::DenyListed);
        }
        if own.iter().any(|l| is_same_listener(*l, ip, addr.port())) {
            return Err(Prohibited::OwnListener);
        }
        if self.allow_private || self.allow.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        classify(ip).map_or(Ok(()), Err)
    }
}

/// `::ffff:a.b.c.d` is `a.b.c.d` for every list comparison.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// `0.0.0.0/8` ("this network") and `::`: never a destination (connecting to them reaches this
/// host).
fn is_unspecified(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 0,
        IpAddr::V6(v6) => v6.is_unspecified(),
    }
}

/// A destination is one of our listeners when the port matches and the address is the bound one,
/// or the listener is bound to every address (`0.0.0.0`, `::`) and the destination is an address
/// of this host: loopback, or any address of its interfaces.
fn is_same_listener(listener: SocketAddr, ip: IpAddr, port: u16) -> bool {
    if listener.port() != port {
        return false;
    }
    let bound = canonical(listener.ip());
    bound == ip || (bound.is_unspecified() && (ip.is_loopback() || is_local_address(ip)))
}

/// Whether `ip` is an address of one of this host's interfaces. Asked only for a destination on
/// the port of a listener bound to every address, so the interface lookup is off the common path.
/// If the interfaces cannot be listed, the address is taken to be local (refused).
fn is_local_address(ip: IpAddr) -> bool {
    match if_addrs::get_if_addrs() {
        Ok(interfaces) => interfaces.iter().any(|i| canonical(i.ip()) == ip),
        Err(e) => {
            tracing::warn!(error = %e, "cannot list interface addresses: refusing {ip} on a listener port");
            true
        }
    }
}

/// What the proxy itself is on the network: its listeners (never a destination) and the
/// connections it has opened (never a client). Shared by every snapshot's dialer.
#[derive(Debug, Clone)]
pub struct Own {
    listeners: Arc<[SocketAddr]>,
    opened: Arc<Mutex<HashSet<(SocketAddr, SocketAddr)>>>,
}

/// The canonical form of a socket address (`::ffff:a.b.c.d` is `a.b.c.d`).
fn canonical_socket(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(canonical(addr.ip()), addr.port())
}

impl Own {
    /// The proxy bound to `listeners`.
    pub fn new(listeners: Vec<SocketAddr>) -> Self {
        Self {
            listeners: Arc::from(listeners),
            opened: Arc::default(),
        }
    }

    /// The bound listener addresses.
    pub fn listeners(&self) -> &[SocketAddr] {
        &self.listeners
    }

    /// Whether `addr` is one of the proxy's own listeners (by bound address, or any local address
    /// for a listener bound to every address).
    pub fn is_listener(&self, addr: SocketAddr) -> bool {
        let ip = canonical(addr.ip());
        self.listeners
            .iter()
            .any(|l| is_same_listener(*l, ip, addr.port()))
    }

    /// Whether an accepted connection (from `peer`, to `local`) is one the proxy opened itself: a
    /// loop through one of its own listeners, which must never be taken for a client. The whole
    /// address pair is compared: the kernel reuses an ephemeral port for connections to other
    /// destinations, so a client may well have the same local port as one of ours.
    pub fn opened(&self, peer: SocketAddr, local: SocketAddr) -> bool {
        let pair = (canonical_socket(peer), canonical_socket(local));
        self.opened
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&pair)
    }

    /// Records a connection the proxy opened from `local` to `remote`, for as long as the
    /// returned value lives.
    fn register(&self, local: SocketAddr, remote: SocketAddr) -> OpenedSocket {
        let pair = (canonical_socket(local), canonical_socket(remote));
        self.opened
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(pair);
        OpenedSocket {
            opened: self.opened.clone(),
            pair,
        }
    }
}

/// Keeps an upstream connection's address pair in [`Own`] for as long as the socket lives.
#[derive(Debug)]
pub struct OpenedSocket {
    opened: Arc<Mutex<HashSet<(SocketAddr, SocketAddr)>>>,
    pair: (SocketAddr, SocketAddr),
}

impl Drop for OpenedSocket {
    fn drop(&mut self) {
        self.opened
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.pair);
    }
}

/// Name resolution failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ResolveError {
    /// The resolver returned no address.
    #[error("no address found")]
    NotFound,
    /// The resolver did not answer in time.
    #[error("resolution timed out")]
    Timeout,
    /// The resolver failed.
    #[error("{0}")]
    Failed(String),
}

/// Reaching the destination failed.
#[derive(Debug, thiserror::Error)]
pub enum DialError {
    /// The name did not resolve.
    #[error("resolution failed: {0}")]
    Resolve(#[from] ResolveError),
    /// An address it resolved to is prohibited.
    #[error("address {addr} is prohibited: {why}")]
    Prohibited {
        /// The offending address.
        addr: IpAddr,
        /// Which range.
        why: Prohibited,
    },
    /// No address accepted the connection.
    #[error("connect to {addr} failed: {source}")]
    Connect {
        /// The last address tried.
        addr: SocketAddr,
        /// The socket error.
        source: std::io::Error,
    },
    /// The connect deadline passed.
    #[error("connect timed out")]
    Timeout,
}

/// An open upstream TCP connection and the exact address it went to.
#[derive(Debug)]
pub struct Dialed {
    /// The connected socket (TCP_NODELAY set).
    pub stream: TcpStream,
    /// The peer address, as judged.
    pub addr: SocketAddr,
    /// Marks the socket as the proxy's own while it lives: keep it as long as `stream`.
    pub opened: Option<OpenedSocket>,
}

/// Resolves, judges and dials destinations for one configuration snapshot.
#[derive(Debug, Clone)]
pub struct Dialer {
    policy: Arc<NetworkPolicy>,
    own: Own,
    connect_timeout: Duration,
}

impl Dialer {
    /// A dialer for `policy`, refusing the proxy's `own` listeners and registering the sockets
    /// it opens there, giving up after `connect_timeout` (which covers resolution and connect
    /// together).
    pub fn new(policy: Arc<NetworkPolicy>, own: Own, connect_timeout: Duration) -> Self {
        Self {
            policy,
            own,
            connect_timeout,
        }
    }

    /// Resolves `host` once: IP literals as they are, then `network.resolve`, then the system
    /// resolver (which honours /etc/hosts).
    pub async fn resolve(&self, host: &Host, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
        let name = match host {
            Host::Ip(ip) => return Ok(vec![SocketAddr::new(*ip, port)]),
            Host::Name(name) => name,
        };
        if let Some(ips) = self.policy.resolve.get(name) {
            return Ok(ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect());
        }
        let lookup = tokio::net::lookup_host((name.as_str(), port));
        let mut addrs: Vec<SocketAddr> = tokio::time::timeout(self.connect_timeout, lookup)
            .await
            .map_err(|_| ResolveError::Timeout)?
            .map_err(|e| ResolveError::Failed(e.to_string()))?
            .collect();
        addrs.dedup();
        if addrs.is_empty() {
            return Err(ResolveError::NotFound);
        }
        Ok(addrs)
    }

    /// Resolves `host` and judges every address; one prohibited address refuses the name.
    pub async fn resolve_checked(
        &self,
        host: &Host,
        port: u16,
    ) -> Result<Vec<SocketAddr>, DialError> {
        let addrs = self.resolve(host, port).await?;
        for addr in &addrs {
            self.policy
                .check(*addr, self.own.listeners())
                .map_err(|why| DialError::Prohibited {
                    addr: addr.ip(),
                    why,
                })?;
        }
        Ok(addrs)
    }

    /// Resolves, judges every address (one prohibited address refuses the whole name, so a
    /// mixed answer cannot be used to reach an internal host), then connects to the first that
    /// accepts, all within the connect timeout.
    pub async fn dial(&self, host: &Host, port: u16) -> Result<Dialed, DialError> {
        let deadline = tokio::time::Instant::now() + self.connect_timeout;
        let addrs = self.resolve_checked(host, port).await?;
        let mut last = None;
        for addr in addrs {
            match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
                Err(_) => return Err(DialError::Timeout),
                Ok(Ok(stream)) => {
                    // Small writes (TLS records, request heads) must not wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    let opened = stream
                        .local_addr()
                        .ok()
                        .map(|local| self.own.register(local, addr));
                    return Ok(Dialed {
                        stream,
                        addr,
                        opened,
                    });
                }
                Ok(Err(source)) => last = Some(DialError::Connect { addr, source }),
            }
        }
        Err(last.unwrap_or(DialError::Resolve(ResolveError::NotFound)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Prohibited::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn every_special_range_of_spec_section_5() {
        let table: &[(&str, Option<Prohibited>)] = &[
            // IPv4
            ("0.0.0.0", Some(Unspecified)),
            ("0.1.2.3", Some(Unspecified)),
            ("127.0.0.1", Some(Loopback)),
            ("127.255.255.254", Some(Loopback)),
            ("10.0.0.1", Some(Private)),
            ("172.16.0.1", Some(Private)),
            ("172.31.255.255", Some(Private)),
            ("172.32.0.1", None),
            ("172.15.255.255", None),
            ("192.168.1.1", Some(Private)),
            ("169.254.1.1", Some(LinkLocal)),
            ("169.254.169.254", Some(CloudMetadata)),
            ("100.64.0.1", Some(Cgnat)),
            ("100.127.255.255", Some(Cgnat)),
            ("100.128.0.1", None),
            ("224.0.0.1", Some(Multicast)),
            ("239.255.255.250", Some(Multicast)),
            ("255.255.255.255", Some(Broadcast)),
            ("240.0.0.1", Some(Reserved)),
            ("192.0.0.8", Some(Reserved)),
            ("192.88.99.1", Some(Reserved)),
            ("192.0.2.1", Some(Documentation)),
            ("198.51.100.7", Some(Documentation)),
            ("203.0.113.9", Some(Documentation)),
            ("198.18.0.1", Some(Benchmarking)),
            ("198.19.255.255", Some(Benchmarking)),
            ("198.20.0.1", None),
            ("8.8.8.8", None),
            ("140.82.112.6", None),
            // IPv6
            ("::", Some(Unspecified)),
            ("::1", Some(Loopback)),
            ("fc00::1", Some(Private)),
            ("fd12:3456::1", Some(Private)),
            ("fec0::1", Some(Private)),
            ("fe80::1", Some(LinkLocal)),
            ("ff02::1", Some(Multicast)),
            ("2001:db8::1", Some(Documentation)),
            ("3fff::1", Some(Documentation)),
            ("2001:2::1", Some(Benchmarking)),
            ("100::1", Some(Reserved)),
            ("fd00:ec2::254", Some(CloudMetadata)),
            ("64:ff9b:1::1", Some(Private)),
            ("2606:4700::1111", None),
            ("2a00:1450:4001::200e", None),
            // IPv6 embedding IPv4, judged by the IPv4 inside.
            ("::ffff:127.0.0.1", Some(Loopback)),
            ("::ffff:10.1.2.3", Some(Private)),
            ("::ffff:169.254.169.254", Some(CloudMetadata)),
            ("::ffff:8.8.8.8", None),
            ("::127.0.0.1", Some(Loopback)),
            ("::10.0.0.1", Some(Private)),
            ("64:ff9b::10.0.0.1", Some(Private)),
            ("64:ff9b::127.0.0.1", Some(Loopback)),
            ("64:ff9b::8.8.8.8", None),
            ("2002:7f00:1::", Some(Loopback)),
            ("2002:a9fe:a9fe::1", Some(CloudMetadata)),
            ("2002:0808:0808::1", None),
            // Teredo: server 65.54.227.120, client 127.0.0.1 (stored inverted: 80ff:fffe).
            ("2001:0:4136:e378:8000:63bf:80ff:fffe", Some(Loopback)),
            // Teredo with a private server address.
            ("2001:0:0a00:0001:8000:63bf:f7f7:f7f7", Some(Private)),
            // Teredo with public server and client (client 8.8.8.8 = f7f7:f7f7 inverted).
            ("2001:0:4136:e378:8000:63bf:f7f7:f7f7", None),
        ];
        for (addr, want) in table {
            assert_eq!(classify(ip(addr)), *want, "{addr}");
        }
    }

    #[test]
    fn exceptions_and_deny_list() {
        let own: Vec<SocketAddr> = vec!["127.0.0.1:3128".parse().unwrap()];
        let mut p = NetworkPolicy::default();
        let sa = |s: &str| -> SocketAddr { s.parse().unwrap() };
        assert_eq!(p.check(sa("127.0.0.1:80"), &own), Err(Loopback));
        assert_eq!(p.check(sa("8.8.8.8:443"), &own), Ok(()));
        p.allow = vec!["127.0.0.0/8".parse().unwrap()];
        assert_eq!(p.check(sa("127.0.0.1:80"), &own), Ok(()));
        assert_eq!(p.check(sa("[::ffff:127.0.0.1]:80"), &own), Ok(()));
        assert_eq!(p.check(sa("127.0.0.1:3128"), &own), Err(OwnListener));
        p.deny = vec!["8.8.8.0/24".parse().unwrap()];
        assert_eq!(p.check(sa("8.8.8.8:443"), &own), Err(DenyListed));
        p.allow_private = true;
        assert_eq!(p.check(sa("10.1.1.1:443"), &own), Ok(()));
        assert_eq!(
            p.check(sa("8.8.8.8:443"), &own),
            Err(DenyListed),
            "deny beats allow"
        );
        let any: Vec<SocketAddr> = vec!["0.0.0.0:3128".parse().unwrap()];
        assert_eq!(p.check(sa("127.0.0.1:3128"), &any), Err(OwnListener));
        assert_eq!(p.check(sa("127.0.0.1:3129"), &any), Ok(()));
        // Unspecified addresses, in every spelling, whatever allow_private says.
        for unspecified in [
            "0.0.0.0:3129",
            "0.1.2.3:80",
            "[::]:80",
            "[::ffff:0.0.0.0]:3129",
        ] {
            assert_eq!(
                p.check(sa(unspecified), &own),
                Err(Unspecified),
                "{unspecified}"
            );
        }
        p.allow = vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
        assert_eq!(p.check(sa("0.0.0.0:80"), &own), Err(Unspecified));
        // Every address of this host's interfaces is the listener bound to 0.0.0.0.
        for interface in if_addrs::get_if_addrs().unwrap() {
            let on_listener = SocketAddr::new(interface.ip(), 3128);
            assert_eq!(
                p.check(on_listener, &any),
                Err(OwnListener),
                "{on_listener}"
            );
        }
    }

    #[test]
    fn sockets_the_proxy_opened_are_known_while_they_live() {
        let own = Own::new(vec!["127.0.0.1:3128".parse().unwrap()]);
        let sa = |s: &str| -> SocketAddr { s.parse().unwrap() };
        let opened = own.register(sa("127.0.0.1:40000"), sa("127.0.0.1:3128"));
        assert!(own.opened(sa("127.0.0.1:40000"), sa("127.0.0.1:3128")));
        assert!(own.opened(
            sa("[::ffff:127.0.0.1]:40000"),
            sa("[::ffff:127.0.0.1]:3128")
        ));
        // The same local port towards another destination is someone else's connection.
        assert!(!own.opened(sa("127.0.0.1:40000"), sa("127.0.0.1:9090")));
        assert!(!own.opened(sa("127.0.0.1:40001"), sa("127.0.0.1:3128")));
        drop(opened);
        assert!(!own.opened(sa("127.0.0.1:40000"), sa("127.0.0.1:3128")));
    }
}
