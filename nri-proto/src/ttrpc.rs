//! ttrpc's wire format: a 10-byte header (length u32, stream id u32, both
//! big-endian; message type u8; flags u8) followed by a protobuf `Request`
//! or `Response`.
//!
//! Hand-written because the `ttrpc` crate owns its socket (one per
//! connection) and brings rust-protobuf beside our prost; NRI runs two ttrpc
//! connections over one multiplexed socket, so we need the codec alone.

use bytes::{Buf, BufMut, BytesMut};
use prost::Message;

/// Header length.
pub const HEADER_LEN: usize = 10;
/// The largest message body ttrpc accepts (4 MiB).
pub const MAX_MESSAGE: usize = 4 << 20;
/// Message type of a request.
pub const TYPE_REQUEST: u8 = 1;
/// Message type of a response.
pub const TYPE_RESPONSE: u8 = 2;

/// gRPC status codes used here.
pub mod code {
    /// The method is not known.
    pub const UNIMPLEMENTED: i32 = 12;
    /// The request could not be decoded.
    pub const INVALID_ARGUMENT: i32 = 3;
    /// The message is larger than allowed.
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    /// The handler failed.
    pub const INTERNAL: i32 = 13;
}

/// `ttrpc.Request`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Request {
    /// Fully qualified service name.
    #[prost(string, tag = "1")]
    pub service: String,
    /// Method name.
    #[prost(string, tag = "2")]
    pub method: String,
    /// The encoded request message.
    #[prost(bytes = "vec", tag = "3")]
    pub payload: Vec<u8>,
    /// The caller's deadline, relative, in ns (0: none).
    #[prost(int64, tag = "4")]
    pub timeout_nano: i64,
}

/// `ttrpc.Response`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Response {
    /// Set on failure.
    #[prost(message, optional, tag = "1")]
    pub status: Option<Status>,
    /// The encoded response message.
    #[prost(bytes = "vec", tag = "2")]
    pub payload: Vec<u8>,
}

/// `google.rpc.Status`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    /// gRPC code; 0 is OK.
    #[prost(int32, tag = "1")]
    pub code: i32,
    /// What went wrong.
    #[prost(string, tag = "2")]
    pub message: String,
}

impl Status {
    /// A failure status.
    pub fn new(code: i32, message: impl Into<String>) -> Status {
        Status {
            code,
            message: message.into(),
        }
    }
}

/// A message header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Body length.
    pub length: u32,
    /// Stream id (odd for client-initiated streams).
    pub stream: u32,
    /// [`TYPE_REQUEST`] or [`TYPE_RESPONSE`] (or data frames, unused here).
    pub kind: u8,
    /// Stream flags (unused by unary calls).
    pub flags: u8,
}

impl Header {
    /// Parses the first [`HEADER_LEN`] bytes of `b`.
    pub fn parse(b: &[u8]) -> Header {
        let mut b = &b[..HEADER_LEN];
        Header {
            length: b.get_u32(),
            stream: b.get_u32(),
            kind: b.get_u8(),
            flags: b.get_u8(),
        }
    }
}

/// One decoded message (body still encoded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Its header.
    pub header: Header,
    /// Its body.
    pub body: bytes::Bytes,
}

/// What [`Decoder::next`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A whole message.
    Frame(Frame),
    /// A message over [`MAX_MESSAGE`]: its body is being skipped; the
    /// sender's stream gets an error reply.
    TooLarge(Header),
}

/// Splits one connection's byte stream into messages. Bodies over the limit
/// are skipped as they arrive, so the buffer never holds more than one
/// message and a hostile length cannot make us allocate it.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: BytesMut,
    skip: usize,
}

impl Decoder {
    /// Appends received bytes.
    pub fn push(&mut self, mut data: &[u8]) {
        if self.skip > 0 {
            let n = self.skip.min(data.len());
            self.skip -= n;
            data = &data[n..];
        }
        self.buf.extend_from_slice(data);
    }

    /// The next message, if one is complete.
    pub fn next_message(&mut self) -> Option<Decoded> {
        if self.skip > 0 || self.buf.len() < HEADER_LEN {
            return None;
        }
        let header = Header::parse(&self.buf);
        let len = header.length as usize;
        if len > MAX_MESSAGE {
            self.buf.advance(HEADER_LEN);
            let n = len.min(self.buf.len());
            self.buf.advance(n);
            self.skip = len - n;
            return Some(Decoded::TooLarge(header));
        }
        if self.buf.len() < HEADER_LEN + len {
            return None;
        }
        self.buf.advance(HEADER_LEN);
        let body = self.buf.split_to(len).freeze();
        Some(Decoded::Frame(Frame { header, body }))
    }
}

/// Encodes one message: header plus `body`.
pub fn encode(stream: u32, kind: u8, body: &impl Message) -> Vec<u8> {
    let len = body.encoded_len();
    let mut out = Vec::with_capacity(HEADER_LEN + len);
    out.put_u32(len as u32);
    out.put_u32(stream);
    out.put_u8(kind);
    out.put_u8(0);
    body.encode(&mut out)
        .expect("a Vec grows to fit any message");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(stream: u32) -> Vec<u8> {
        encode(
            stream,
            TYPE_REQUEST,
            &Request {
                service: "s".into(),
                method: "m".into(),
                payload: vec![1, 2, 3],
                timeout_nano: 0,
            },
        )
    }

    #[test]
    fn messages_split_across_pushes_come_out_whole() {
        let mut bytes = request(1);
        bytes.extend(request(3));
        let mut d = Decoder::default();
        let mut got = Vec::new();
        for b in bytes.chunks(3) {
            d.push(b);
            while let Some(Decoded::Frame(f)) = d.next_message() {
                got.push(f);
            }
        }
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].header.stream, 3);
        let r = Request::decode(got[0].body.clone()).unwrap();
        assert_eq!((r.service.as_str(), r.payload), ("s", vec![1, 2, 3]));
    }

    #[test]
    fn an_oversized_message_is_skipped_and_the_next_one_read() {
        let mut d = Decoder::default();
        let mut hdr = Vec::new();
        hdr.put_u32((MAX_MESSAGE + 5) as u32);
        hdr.put_u32(7);
        hdr.put_u8(TYPE_REQUEST);
        hdr.put_u8(0);
        d.push(&hdr);
        match d.next_message() {
            Some(Decoded::TooLarge(h)) => assert_eq!(h.stream, 7),
            other => panic!("{other:?}"),
        }
        // The body arrives in pieces and is dropped, never buffered.
        let junk = vec![0xAAu8; 1 << 20];
        for _ in 0..4 {
            d.push(&junk);
            assert!(d.next_message().is_none());
            assert!(d.buf.capacity() < 2 << 20);
        }
        let mut tail = vec![0xAAu8; 5];
        tail.extend(request(9));
        d.push(&tail);
        match d.next_message() {
            Some(Decoded::Frame(f)) => assert_eq!(f.header.stream, 9),
            other => panic!("{other:?}"),
        }
    }
}
