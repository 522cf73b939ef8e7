//! NRI's connection multiplexer: several byte streams over one unix socket.
//! Each frame is an 8-byte header (connection id u32, payload length u32,
//! both big-endian) and the payload. Id 0 is reserved; id 1 carries the
//! plugin's ttrpc service, id 2 the runtime's.
//!
//! Hand-written: no Rust crate speaks it (it is NRI's own, in Go).

use bytes::BufMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Frame header length.
pub const HEADER_LEN: usize = 8;
/// The plugin's service connection (the runtime calls us here).
pub const PLUGIN_CONN: u32 = 1;
/// The runtime's service connection (we call the runtime here).
pub const RUNTIME_CONN: u32 = 2;
/// The largest frame payload accepted: a whole ttrpc message at most. The
/// runtime writes each ttrpc message as one frame; anything larger is a
/// broken or hostile peer, and the trunk cannot be resynchronised after it.
pub const MAX_PAYLOAD: usize = crate::ttrpc::MAX_MESSAGE + crate::ttrpc::HEADER_LEN;

/// Errors of reading the trunk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the socket failed (or it closed mid-frame).
    #[error("NRI socket read")]
    Io(#[from] std::io::Error),
    /// A frame's length is beyond [`MAX_PAYLOAD`].
    #[error("NRI frame of {len} bytes on connection {conn} exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge {
        /// Connection id.
        conn: u32,
        /// Declared length.
        len: u32,
    },
    /// A frame on the reserved connection 0.
    #[error("NRI frame on reserved connection 0")]
    Reserved,
}

/// One frame.
#[derive(Debug)]
pub struct Frame {
    /// Connection id.
    pub conn: u32,
    /// Payload.
    pub payload: Vec<u8>,
}

/// Reads the next frame; `Ok(None)` at a clean end of stream.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, Error> {
    let mut hdr = [0u8; HEADER_LEN];
    match r.read_exact(&mut hdr).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let conn = u32::from_be_bytes(hdr[..4].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(hdr[4..].try_into().expect("4 bytes"));
    if conn == 0 {
        return Err(Error::Reserved);
    }
    if len as usize > MAX_PAYLOAD {
        return Err(Error::TooLarge { conn, len });
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).await?;
    Ok(Some(Frame { conn, payload }))
}

/// Encodes a frame carrying `payload` on `conn`.
pub fn encode_frame(conn: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.put_u32(conn);
    out.put_u32(payload.len() as u32);
    out.extend_from_slice(payload);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_eof_is_clean() {
        let mut bytes = encode_frame(PLUGIN_CONN, b"hello");
        bytes.extend(encode_frame(RUNTIME_CONN, b""));
        let mut r = bytes.as_slice();
        let f = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!((f.conn, f.payload.as_slice()), (1, &b"hello"[..]));
        let f = read_frame(&mut r).await.unwrap().unwrap();
        assert_eq!((f.conn, f.payload.len()), (2, 0));
        assert!(read_frame(&mut r).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn hostile_headers_are_errors_without_allocating() {
        let mut r: &[u8] = &[0, 0, 0, 1, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut r).await,
            Err(Error::TooLarge { conn: 1, .. })
        ));
        let mut r: &[u8] = &[0, 0, 0, 0, 0, 0, 0, 1, 9];
        assert!(matches!(read_frame(&mut r).await, Err(Error::Reserved)));
        // Truncated mid-payload: an error, not a clean end.
        let mut r: &[u8] = &[0, 0, 0, 1, 0, 0, 0, 9, 1, 2];
        assert!(matches!(read_frame(&mut r).await, Err(Error::Io(_))));
    }

    #[tokio::test]
    async fn random_bytes_never_panic() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            let mut buf = Vec::new();
            for _ in 0..(seed % 64) {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                buf.push(seed as u8);
            }
            let mut r = buf.as_slice();
            while let Ok(Some(_)) = read_frame(&mut r).await {}
        }
    }
}
