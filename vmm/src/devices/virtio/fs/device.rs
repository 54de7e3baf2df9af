//! The virtio-fs device model: one high-priority queue and one request queue, the mount tag
//! in config space, and the loop handing each request's descriptor chain to the FUSE
//! server on the event-loop thread.

use std::sync::Arc;

use event_manager::{EventOps, Events, MutEventSubscriber};
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::Server;
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::{Queue, QueueT};

use super::{FS_DEVICE_ID, TAG_LEN};
use crate::devices::virtio::activation::{Activation, DeviceEvent};
use crate::devices::virtio::{
    ActivateError, QueueSnapshot, VirtioDevice, VirtioInterrupt, VirtioQueue,
};
use crate::memory::GuestMemory;

/// Queue 0 is the high-priority queue (FORGET, INTERRUPT), queue 1 the request queue;
/// both are served the same way.
const QUEUE_SIZES: [u16; 2] = [128, 256];

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum FsDeviceError {
    #[error("virtio-fs tag {0:?} is empty or longer than 36 bytes")]
    BadTag(String),
    #[error("virtio-fs eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// A virtio-fs device serving `F`.
pub struct VirtioFs<F: FileSystem + Sync> {
    tag: [u8; TAG_LEN],
    server: Arc<Server<F>>,
    activation: Activation,
    requests: u64,
}

impl<F: FileSystem + Sync> std::fmt::Debug for VirtioFs<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioFs")
            .field(
                "tag",
                &String::from_utf8_lossy(&self.tag).trim_end_matches('\0'),
            )
            .field("active", &self.activation.is_active())
            .field("requests", &self.requests)
            .finish()
    }
}

impl<F: FileSystem + Sync> VirtioFs<F> {
    /// A device the guest mounts as `mount -t virtiofs TAG DIR`, served by `server`.
    pub fn new(tag: &str, server: Arc<Server<F>>) -> Result<Self, FsDeviceError> {
        if tag.is_empty() || tag.len() > TAG_LEN {
            return Err(FsDeviceError::BadTag(tag.to_string()));
        }
        let mut t = [0u8; TAG_LEN];
        t[..tag.len()].copy_from_slice(tag.as_bytes());
        Ok(VirtioFs {
            tag: t,
            server,
            activation: Activation::new("virtio-fs").map_err(FsDeviceError::EventFd)?,
            requests: 0,
        })
    }

    /// Requests served so far.
    pub fn requests(&self) -> u64 {
        self.requests
    }

    /// Serves every request pending on queue `index`. Returns how many were served.
    pub fn process_queue(&mut self, index: usize) -> usize {
        let Some(a) = self.activation.active() else {
            return 0;
        };
        let mem = &a.mem;
        let q: &mut Queue = &mut a.queues[index].queue;
        let mut served = 0;
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let len = match (
                Reader::from_descriptor_chain(mem, chain.clone()),
                VirtioFsWriter::new(mem, chain),
            ) {
                (Ok(reader), Ok(writer)) => {
                    match self
                        .server
                        .handle_message(reader, writer.into(), None, None)
                    {
                        Ok(n) => n as u32,
                        Err(e) => {
                            log::debug!("virtio-fs: request failed: {e:?}");
                            0
                        }
                    }
                }
                (Err(e), _) | (_, Err(e)) => {
                    log::warn!("virtio-fs: malformed request chain: {e:?}");
                    0
                }
            };
            if let Err(e) = q.add_used(mem, head, len) {
                log::error!("virtio-fs: add_used: {e:?}");
            }
            served += 1;
        }
        self.requests += served as u64;
        if served > 0 {
            a.signal_used(index);
        }
        served
    }
}

impl<F: FileSystem + Sync + Send> VirtioDevice for VirtioFs<F> {
    fn device_type(&self) -> u32 {
        FS_DEVICE_ID
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_fs_config { u8 tag[36]; le32 num_request_queues; }
        let mut cfg = [0u8; TAG_LEN + 4];
        cfg[..TAG_LEN].copy_from_slice(&self.tag);
        cfg[TAG_LEN..].copy_from_slice(&((QUEUE_SIZES.len() - 1) as u32).to_le_bytes());
        crate::devices::virtio::read_config_window(&cfg, offset, data);
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<VirtioQueue>,
    ) -> Result<(), ActivateError> {
        self.activation
            .activate(mem, interrupt, queues, QUEUE_SIZES.len())
    }

    fn queue_states(&self) -> Option<Vec<QueueSnapshot>> {
        self.activation.queue_states()
    }
}

impl<F: FileSystem + Sync + Send> MutEventSubscriber for VirtioFs<F> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match self.activation.handle(&events, ops) {
            DeviceEvent::Activated => {}
            DeviceEvent::Queue(index) if index < QUEUE_SIZES.len() => {
                self.process_queue(index);
            }
            other => log::warn!("virtio-fs: unexpected event {other:?}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.activation.init(ops);
    }
}
