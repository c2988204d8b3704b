//! The simulated driver: no side effects; the frontend serves and compute
//! nodes install as soon as they start. simnet and unit tests use it.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use super::{ComputeDriver, DriverError, NodeSpec, NodeState, NodeStatus};

/// Nodes that exist only in memory.
#[derive(Debug, Default)]
pub struct SimDriver {
    nodes: BTreeMap<String, BTreeMap<u32, NodeStatus>>,
    /// Every node started and not stopped, as it was first started.
    specs: BTreeMap<String, BTreeMap<u32, NodeSpec>>,
}

impl SimDriver {
    /// A driver with no nodes.
    pub fn new() -> SimDriver {
        SimDriver::default()
    }

    /// The nodes started for `cluster`, by index, as first started.
    pub fn started(&self, cluster: &str) -> Option<&BTreeMap<u32, NodeSpec>> {
        self.specs.get(cluster)
    }

    /// Every cluster with nodes started.
    pub fn started_clusters(&self) -> impl Iterator<Item = &String> {
        self.specs.keys()
    }
}

impl ComputeDriver for SimDriver {
    fn start_node(&mut self, spec: &NodeSpec) -> Result<(), DriverError> {
        self.specs
            .entry(spec.cluster.clone())
            .or_default()
            .entry(spec.index)
            .or_insert_with(|| spec.clone());
        let [a, b, c, _] = spec.subnet.octets();
        let server = Ipv4Addr::new(a, b, c, 1);
        let state = if spec.frontend {
            NodeState::Serving { ip: server }
        } else {
            let host = u8::try_from(10 + spec.index).unwrap_or(254);
            NodeState::Installed {
                ip: Ipv4Addr::new(a, b, c, host),
                server,
            }
        };
        self.nodes
            .entry(spec.cluster.clone())
            .or_default()
            .entry(spec.index)
            .or_insert(NodeStatus {
                index: spec.index,
                frontend: spec.frontend,
                state,
            });
        Ok(())
    }

    fn poll(&mut self, cluster: &str) -> Vec<NodeStatus> {
        self.nodes
            .get(cluster)
            .map(|nodes| nodes.values().cloned().collect())
            .unwrap_or_default()
    }

    fn stop_cluster(&mut self, cluster: &str) -> Result<(), DriverError> {
        self.nodes.remove(cluster);
        self.specs.remove(cluster);
        Ok(())
    }

    fn cleanup_stale(
        &mut self,
        _keep: &std::collections::BTreeSet<String>,
    ) -> Result<(), DriverError> {
        // Nothing outlives the process.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::node_mac;

    #[test]
    fn nodes_install_at_once_and_stop_cleanly() {
        let mut driver = SimDriver::new();
        for index in 0..3 {
            let spec = NodeSpec {
                cluster: "c".into(),
                index,
                frontend: index == 0,
                bridge: "br".into(),
                subnet: Ipv4Addr::new(198, 19, 7, 0),
                mac: node_mac("c", index),
                vlan: 100,
                shape: None,
            };
            driver.start_node(&spec).unwrap();
            driver.start_node(&spec).unwrap();
        }
        let nodes = driver.poll("c");
        assert_eq!(nodes.len(), 3);
        assert!(matches!(nodes[0].state, NodeState::Serving { .. }));
        assert!(
            nodes[1..]
                .iter()
                .all(|n| matches!(n.state, NodeState::Installed { .. }))
        );
        driver.stop_cluster("c").unwrap();
        assert!(driver.poll("c").is_empty());
    }
}
