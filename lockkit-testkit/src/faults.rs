//! Server faults for fault tests: instances of `scripts/services` stopped for the length of a
//! test and started again when it ends, also when it fails.

use std::path::Path;
use std::process::Command;

/// Runs `scripts/services <verb> <instances...>` of this workspace; whether it succeeded.
pub fn services(verb: &str, instances: &[&str]) -> bool {
    let kit = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = kit.parent().unwrap_or(kit).join("scripts").join("services");
    Command::new(script)
        .arg(verb)
        .args(instances)
        .status()
        .is_ok_and(|s| s.success())
}

/// Instances of `scripts/services` stopped (`stop-one`, data kept) while this value lives and
/// started again (`start-one`) when it is dropped, also when the test panics.
#[derive(Debug)]
pub struct Stopped(Vec<&'static str>);

impl Stopped {
    /// Stops `instances` (e.g. `["etcd"]`, `["redis-16379"]`); panics if that fails.
    pub fn new(instances: &[&'static str]) -> Self {
        assert!(services("stop-one", instances), "stop {instances:?}");
        Stopped(instances.to_vec())
    }

    /// Starts the instances again now; panics if that fails.
    pub fn start(mut self) {
        let instances = std::mem::take(&mut self.0);
        assert!(services("start-one", &instances), "start {instances:?}");
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        if !self.0.is_empty() && !services("start-one", &self.0) {
            eprintln!("could not restart {:?}", self.0);
        }
    }
}
