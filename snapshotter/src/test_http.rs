//! A request head read off a plain TCP connection, for the tests' tiny
//! registries (`lazy`, `remote`).

use tokio::io::AsyncReadExt;

/// The request head up to its blank line; None when the client left or
/// opened with a TLS hello (0x16), after which it tries plain HTTP.
pub async fn read_head(conn: &mut tokio::net::TcpStream) -> Option<String> {
    let mut req = Vec::new();
    let mut buf = [0u8; 4096];
    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
        match conn.read(&mut buf).await {
            Ok(n) if n > 0 && buf[0] != 0x16 => req.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&req).into_owned())
}
