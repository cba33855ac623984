//! Validation of `[network]`: CIDR lists and static resolutions, into the [`NetworkPolicy`] the
//! dialler enforces. Also the CIDR-list parser `[[clients]]` networks share.

use std::collections::HashMap;
use std::net::IpAddr;

use ipnet::IpNet;

use crate::config::error::Problems;
use crate::config::raw::RawNetwork;
use crate::net::NetworkPolicy;
use crate::policy::normalize_host;

/// `[network]`.
pub(super) fn network(n: &RawNetwork, p: &mut Problems) -> NetworkPolicy {
    let allow = cidrs("network.allow_cidrs", &n.allow_cidrs, p);
    let deny = cidrs("network.deny_cidrs", &n.deny_cidrs, p);
    let mut resolve: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for (name, ips) in &n.resolve {
        match normalize_host(name) {
            Some(host) if !ips.is_empty() => {
                resolve.insert(host, ips.clone());
            }
            Some(_) => p.add(
                format!("network.resolve.{name}"),
                "needs at least one address",
            ),
            None => p.add(format!("network.resolve.{name}"), "is not a valid DNS name"),
        }
    }
    NetworkPolicy {
        allow_private: n.allow_private,
        allow,
        deny,
        resolve,
    }
}

/// The networks of `list` (the list at `key`); each entry that is not one is a problem.
pub(super) fn cidrs(key: &str, list: &[String], p: &mut Problems) -> Vec<IpNet> {
    list.iter()
        .enumerate()
        .filter_map(|(i, text)| match parse_net(text) {
            Some(net) => Some(net),
            None => {
                p.add(
                    format!("{key}[{i}]"),
                    format!("{text:?} is not a CIDR or an IP address"),
                );
                None
            }
        })
        .collect()
}

/// A CIDR, or a bare address taken as a single-host network.
fn parse_net(text: &str) -> Option<IpNet> {
    text.parse::<IpNet>()
        .map(|n| n.trunc())
        .ok()
        .or_else(|| text.parse::<IpAddr>().ok().map(IpNet::from))
}
