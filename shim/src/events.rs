//! Task events to containerd, named without protobuf reflection.
//!
//! containerd-shim's `RemotePublisher::publish` names each event by its
//! protobuf descriptor. The first descriptor a process asks for parses the
//! events' .proto files and all they import (descriptor.proto among them):
//! about 350 KiB of heap that stays for the shim's life, a third of its
//! own memory, in every shim on the node. The names are fixed by
//! containerd's API, so each event type carries its own as a constant, and
//! the envelope goes to the same publisher's queue through its `forward`
//! (the Events service it also implements), keeping its retries and
//! reconnection.

use std::collections::HashMap;

use containerd_shim::asynchronous::publisher::RemotePublisher;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::Message;
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::shim::event::Envelope;
use containerd_shim::protos::shim::events::ForwardRequest;
use containerd_shim::protos::shim_async::Events;
use containerd_shim::protos::ttrpc::r#async::TtrpcContext;

/// A task event and the protobuf name containerd knows it by.
pub trait Event: Message {
    /// `containerd.events.<Message>`, the `Any` type URL containerd
    /// decodes by.
    const TYPE_URL: &'static str;
}

macro_rules! named {
    ($($event:ident),* $(,)?) => {
        $(impl Event for $event {
            const TYPE_URL: &'static str = concat!("containerd.events.", stringify!($event));
        })*
        /// Every event type the shim publishes, by name (for the tests).
        #[cfg(test)]
        const ALL: &[(&str, fn() -> String)] = &[$(
            (<$event as Event>::TYPE_URL, || {
                <$event as containerd_shim::protos::protobuf::MessageFull>::descriptor()
                    .full_name()
                    .to_string()
            }),
        )*];
    };
}

named!(
    TaskCreate,
    TaskStart,
    TaskDelete,
    TaskExit,
    TaskOOM,
    TaskExecAdded,
    TaskExecStarted,
    TaskPaused,
    TaskResumed,
    TaskIO,
);

/// The envelope of `event` on `topic` in `namespace`.
pub fn envelope<E: Event>(
    topic: &str,
    namespace: &str,
    at: containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp,
    event: &E,
) -> Result<Envelope, containerd_shim::protos::protobuf::Error> {
    Ok(Envelope {
        timestamp: containerd_shim::protos::protobuf::MessageField::some(at),
        namespace: namespace.to_string(),
        topic: topic.to_string(),
        event: containerd_shim::protos::protobuf::MessageField::some(Any {
            type_url: E::TYPE_URL.to_string(),
            value: event.write_to_bytes()?,
            ..Default::default()
        }),
        ..Default::default()
    })
}

/// Queues `envelope` on the publisher (which retries and reconnects).
pub async fn send(
    publisher: &RemotePublisher,
    envelope: Envelope,
) -> Result<(), containerd_shim::protos::ttrpc::Error> {
    let ctx = TtrpcContext {
        mh: Default::default(),
        metadata: HashMap::new(),
        timeout_nano: 0,
    };
    let req = ForwardRequest {
        envelope: containerd_shim::protos::protobuf::MessageField::some(envelope),
        ..Default::default()
    };
    publisher.forward(&ctx, req).await.map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_constant_name_is_the_protobuf_name_containerd_decodes() {
        assert_eq!(ALL.len(), 10);
        for (name, full) in ALL {
            assert_eq!(*name, full());
        }
    }

    #[test]
    fn an_envelope_carries_the_event_under_its_name() {
        let exit = TaskExit {
            container_id: "c1".into(),
            pid: 42,
            exit_status: 137,
            ..Default::default()
        };
        let e = envelope("/tasks/exit", "k8s.io", Default::default(), &exit).unwrap();
        assert_eq!(e.topic, "/tasks/exit");
        assert_eq!(e.namespace, "k8s.io");
        assert_eq!(e.event.type_url, "containerd.events.TaskExit");
        let back = TaskExit::parse_from_bytes(&e.event.value).unwrap();
        assert_eq!((back.pid, back.exit_status), (42, 137));
    }
}
