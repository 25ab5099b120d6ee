//! Loopback ports for local meshes and tests (`medmesh demo`, the benchmarks, e2e tests).

use std::net::TcpListener;
use std::sync::{Mutex, PoisonError};

/// A port on 127.0.0.1 that nothing listens on now and that this process has not handed out
/// before. The kernel may give a port that was free a moment ago to the next `bind(0)` too,
/// before the process it was meant for has bound it: without the record, two ledger replicas
/// started one after the other were once given the same port ("cannot listen on
/// 127.0.0.1:36861: Address already in use").
pub fn free_port() -> std::io::Result<u16> {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(PoisonError::into_inner);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if !given.contains(&port) {
            given.push(port);
            return Ok(port);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn ports_are_never_handed_out_twice() {
        let mut ports: Vec<u16> = (0..2000).map(|_| super::free_port().unwrap()).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), 2000);
    }
}
