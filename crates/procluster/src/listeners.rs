//! Ports shared through the primary.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use crate::primary::{Inner, WorkerHandle};
use crate::protocol::Control;
use crate::worker::WorkerInner;

pub(crate) fn handle_control(
    _inner: &Arc<Inner>,
    _worker: &WorkerHandle,
    _control: Control,
    _fds: Vec<OwnedFd>,
) {
}

pub(crate) fn worker_gone(_inner: &Arc<Inner>, _worker: &WorkerHandle) {}

#[derive(Default)]
pub(crate) struct ConnectionRouter {}

impl ConnectionRouter {
    pub(crate) fn close_all(&self) {}
}

pub(crate) fn incoming_connection(
    _inner: &Arc<WorkerInner>,
    _key: u32,
    _seq: u64,
    _fds: Vec<OwnedFd>,
) {
}
