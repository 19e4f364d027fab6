//! A limit on the incoming connections from one IP address. libp2p's `connection_limits`
//! counts per peer and in total, and an attacker makes identities for free: without this,
//! one host could take every incoming slot. Relayed connections (no IP of their own) are
//! not counted here; the relay limits them.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::task::{Context, Poll};

use libp2p::core::Endpoint;
use libp2p::core::transport::PortUse;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::{
    ConnectionClosed, ConnectionDenied, ConnectionId, FromSwarm, ListenFailure, NetworkBehaviour,
    THandler, THandlerInEvent, THandlerOutEvent, ToSwarm, dummy,
};
use libp2p::{Multiaddr, PeerId};

/// Incoming connections (in their handshake or established) from one IP address at once
/// (for IPv6, one /64: a host is usually given a whole /64): room for a household or an
/// office behind one address, far under the 256 a node takes in all.
pub(crate) const MAX_INCOMING_PER_IP: usize = 32;

/// Refused: too many connections from this address.
#[derive(Debug, thiserror::Error)]
#[error("{ip} already has {MAX_INCOMING_PER_IP} connections open to this node")]
pub(crate) struct TooManyFromIp {
    ip: IpAddr,
}

/// The behaviour: counts incoming connections per IP address and refuses past the limit.
#[derive(Debug, Default)]
pub(crate) struct Behaviour {
    by_connection: HashMap<ConnectionId, IpAddr>,
    per_ip: HashMap<IpAddr, usize>,
}

/// The address connections are counted under: the IPv4 address, or the IPv6 /64.
fn ip_of(addr: &Multiaddr) -> Option<IpAddr> {
    if addr.iter().any(|p| p == Protocol::P2pCircuit) {
        return None;
    }
    addr.iter().find_map(|p| match p {
        Protocol::Ip4(a) => Some(IpAddr::from(a)),
        Protocol::Ip6(a) => Some(IpAddr::from(std::net::Ipv6Addr::from(
            u128::from(a) & !u128::from(u64::MAX),
        ))),
        _ => None,
    })
}

impl Behaviour {
    fn forget(&mut self, id: ConnectionId) {
        if let Some(ip) = self.by_connection.remove(&id)
            && let Some(n) = self.per_ip.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&ip);
            }
        }
    }
}

impl NetworkBehaviour for Behaviour {
    type ConnectionHandler = dummy::ConnectionHandler;
    type ToSwarm = Infallible;

    fn handle_pending_inbound_connection(
        &mut self,
        connection_id: ConnectionId,
        _: &Multiaddr,
        remote_addr: &Multiaddr,
    ) -> Result<(), ConnectionDenied> {
        let Some(ip) = ip_of(remote_addr) else {
            return Ok(());
        };
        let n = self.per_ip.entry(ip).or_default();
        if *n >= MAX_INCOMING_PER_IP {
            return Err(ConnectionDenied::new(TooManyFromIp { ip }));
        }
        *n += 1;
        self.by_connection.insert(connection_id, ip);
        Ok(())
    }

    fn handle_established_inbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: &Multiaddr,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn handle_established_outbound_connection(
        &mut self,
        _: ConnectionId,
        _: PeerId,
        _: &Multiaddr,
        _: Endpoint,
        _: PortUse,
    ) -> Result<THandler<Self>, ConnectionDenied> {
        Ok(dummy::ConnectionHandler)
    }

    fn on_swarm_event(&mut self, event: FromSwarm) {
        match event {
            FromSwarm::ConnectionClosed(ConnectionClosed { connection_id, .. })
            | FromSwarm::ListenFailure(ListenFailure { connection_id, .. }) => {
                self.forget(connection_id);
            }
            _ => {}
        }
    }

    fn on_connection_handler_event(
        &mut self,
        _: PeerId,
        _: ConnectionId,
        event: THandlerOutEvent<Self>,
    ) {
        match event {}
    }

    fn poll(&mut self, _: &mut Context<'_>) -> Poll<ToSwarm<Infallible, THandlerInEvent<Self>>> {
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> Option<IpAddr> {
        ip_of(&text.parse().unwrap())
    }

    #[test]
    fn connections_are_counted_per_ipv4_address_and_ipv6_64() {
        assert_eq!(ip("/ip4/10.0.0.1/tcp/1"), ip("/ip4/10.0.0.1/udp/2/quic-v1"));
        assert_ne!(ip("/ip4/10.0.0.1/tcp/1"), ip("/ip4/10.0.0.2/tcp/1"));
        assert_eq!(
            ip("/ip6/2001:db8:1:2::1/tcp/1"),
            ip("/ip6/2001:db8:1:2:ffff:ffff:ffff:ffff/tcp/1")
        );
        assert_ne!(
            ip("/ip6/2001:db8:1:2::1/tcp/1"),
            ip("/ip6/2001:db8:1:3::1/tcp/1")
        );
        let relayed = "/ip4/10.0.0.9/tcp/4002/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN/p2p-circuit";
        assert_eq!(ip(relayed), None);
    }
}
