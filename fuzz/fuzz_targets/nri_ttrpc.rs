//! The ttrpc decoder (`nri-proto/src/ttrpc.rs`): arbitrary bytes as one
//! connection's stream, pushed in pieces whose sizes the input chooses.
//! However the stream is cut, the decoder must find the same messages as
//! when it gets it whole; bodies then go through the protobuf decoders the
//! session uses.

#![no_main]

use hyperbox_nri_proto::api;
use hyperbox_nri_proto::ttrpc::{Decoded, Decoder, Request, Response};
use libfuzzer_sys::fuzz_target;
use prost::Message;

fn drain(d: &mut Decoder, out: &mut Vec<Decoded>) {
    while let Some(m) = d.next_message() {
        out.push(m);
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let mut whole = Decoder::default();
    whole.push(stream);
    let mut expect = Vec::new();
    drain(&mut whole, &mut expect);

    let mut pieces = Decoder::default();
    let mut got = Vec::new();
    for piece in stream.chunks(usize::from(cut) + 1) {
        pieces.push(piece);
        drain(&mut pieces, &mut got);
    }
    assert_eq!(got, expect, "decoding depends on how the stream is cut");

    for m in expect {
        let Decoded::Frame(f) = m else { continue };
        if let Ok(req) = Request::decode(f.body.clone()) {
            let p = req.payload.as_slice();
            let _ = api::ConfigureRequest::decode(p);
            let _ = api::SynchronizeRequest::decode(p);
            let _ = api::ContainerRequest::decode(p);
            let _ = api::StateChangeEvent::decode(p);
            let _ = api::UpdateContainersRequest::decode(p);
        }
        if let Ok(resp) = Response::decode(f.body) {
            let p = resp.payload.as_slice();
            let _ = api::Empty::decode(p);
            let _ = api::UpdateContainersResponse::decode(p);
        }
    }
});
