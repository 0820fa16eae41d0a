//! One portcullis of a cluster test (tests/cluster.rs, tests/cluster_secure.rs):
//! an in-process instance on its own loopback address, and what its control
//! socket says.

use std::net::SocketAddr;
use std::path::PathBuf;

use portcullis::ops::control::{self, CertRow, ClusterRow, RenewRow, Request, Response};

use super::site::CONTROL;
use super::Proxy;

pub struct Node {
    /// Its `store.etcd.node`.
    pub name: String,
    /// The loopback address its listeners bind.
    pub ip: String,
    /// Its admin endpoint (`admin.bind`).
    pub admin: String,
    /// Where its config's relative paths (`state_dir: state`) point.
    pub dir: PathBuf,
    pub proxy: Proxy,
}

impl Node {
    pub fn imaps(&self) -> SocketAddr {
        self.proxy.addr("imaps")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    pub async fn ask(&self, request: &Request) -> Response {
        control::request(&self.state_dir(), request, CONTROL)
            .await
            .unwrap_or_else(|e| panic!("{}: {request:?}: {e}", self.name))
    }

    /// A forced renewal of the host whose first name is `names[0]`.
    pub async fn renew(&self, names: &[String]) -> RenewRow {
        let request = Request::Renew {
            dry_run: false,
            force: true,
            name: Some(names[0].clone()),
        };
        match self.ask(&request).await {
            Response::Renew(mut rows) if rows.len() == 1 => rows.remove(0),
            other => panic!("{}: renew: {other:?}", self.name),
        }
    }

    pub async fn cert_row(&self, names: &[String]) -> CertRow {
        match self.ask(&Request::Certs).await {
            Response::Certs(rows) => rows
                .into_iter()
                .find(|r| r.names == names)
                .expect("the host is listed"),
            other => panic!("{}: certs: {other:?}", self.name),
        }
    }

    pub async fn cluster(&self) -> ClusterRow {
        match self.ask(&Request::Cluster).await {
            Response::Cluster(row) => row,
            other => panic!("{}: cluster: {other:?}", self.name),
        }
    }
}
