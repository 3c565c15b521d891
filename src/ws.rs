//! WebSocket framing (RFC 6455) for the server side.
//!
//! Server frames are unmasked, so a frame is built once ([`frame`]) and the same `Bytes` goes to
//! every recipient. Client frames must be masked; [`parse_frame`] reads one header from a buffer
//! and never allocates.

use bytes::{BufMut, Bytes, BytesMut};

use crate::protocol::CloseCode;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Length of a server frame header for a payload of `len` bytes.
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=0xFFFF => 4,
        _ => 10,
    }
}

/// Builds one final, unmasked server frame: header and payload in one allocation.
pub fn frame(opcode: u8, payload: &[u8]) -> Bytes {
    frame_of(opcode, &[payload])
}

/// As [`frame`], with the payload given in parts (written one after the other).
pub fn frame_of(opcode: u8, parts: &[&[u8]]) -> Bytes {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let mut out = BytesMut::with_capacity(header_len(len) + len);
    out.put_u8(0x80 | opcode);
    match len {
        0..=125 => out.put_u8(len as u8),
        126..=0xFFFF => {
            out.put_u8(126);
            out.put_u16(len as u16);
        }
        _ => {
            out.put_u8(127);
            out.put_u64(len as u64);
        }
    }
    for part in parts {
        out.put_slice(part);
    }
    out.freeze()
}

pub fn text(payload: &[u8]) -> Bytes {
    frame(OP_TEXT, payload)
}

/// The payload of a server frame built by [`frame`].
pub fn payload_of(frame: &[u8]) -> &[u8] {
    let at = match frame.get(1) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    frame.get(at..).unwrap_or_default()
}

/// A close frame carrying `code` and its reason.
pub fn close(code: CloseCode) -> Bytes {
    let reason = code.reason().as_bytes();
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.code().to_be_bytes());
    payload.extend_from_slice(reason);
    frame(OP_CLOSE, &payload)
}

/// The header of one client frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    pub fin: bool,
    pub opcode: u8,
    pub mask: [u8; 4],
    /// Bytes of header, before the payload.
    pub header_len: usize,
    pub payload_len: usize,
}

/// A client frame that breaks the protocol; each maps to a close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame is not masked")]
    Unmasked,
    #[error("reserved bits or opcode")]
    Reserved,
    #[error("bad control frame")]
    BadControl,
    #[error("message larger than the limit")]
    TooBig,
}

impl FrameError {
    pub fn close_code(self) -> CloseCode {
        match self {
            FrameError::TooBig => CloseCode::TooBig,
            _ => CloseCode::ProtocolError,
        }
    }
}

/// Reads one frame header from `buf`. `Ok(None)` means more bytes are needed. Payloads longer
/// than `max_payload` are refused from the header alone, before any of them is buffered.
pub fn parse_frame(buf: &[u8], max_payload: usize) -> Result<Option<FrameHead>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let opcode = b0 & 0x0F;
    if b0 & 0x70 != 0 || !matches!(opcode, 0x0..=0x2 | 0x8..=0xA) {
        return Err(FrameError::Reserved);
    }
    if b1 & 0x80 == 0 {
        return Err(FrameError::Unmasked);
    }
    let fin = b0 & 0x80 != 0;
    let (len, at) = match b1 & 0x7F {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4),
        127 if buf.len() >= 10 => (
            u64::from_be_bytes(buf[2..10].try_into().unwrap_or_default()),
            10,
        ),
        126 | 127 => return Ok(None),
        n => (n as u64, 2),
    };
    if opcode >= OP_CLOSE && (!fin || len > 125) {
        return Err(FrameError::BadControl);
    }
    if len > max_payload as u64 {
        return Err(FrameError::TooBig);
    }
    if buf.len() < at + 4 {
        return Ok(None);
    }
    let mask = [buf[at], buf[at + 1], buf[at + 2], buf[at + 3]];
    Ok(Some(FrameHead {
        fin,
        opcode,
        mask,
        header_len: at + 4,
        payload_len: len as usize,
    }))
}

/// XORs `data` with the mask, eight bytes at a time.
pub fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let wide = u64::from_ne_bytes([
        mask[0], mask[1], mask[2], mask[3], mask[0], mask[1], mask[2], mask[3],
    ]);
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        let word = u64::from_ne_bytes(chunk.try_into().unwrap_or_default()) ^ wide;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    // The tail starts at a multiple of 8, hence of 4: the mask phase restarts at 0.
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= mask[i & 3];
    }
}

/// The close code a peer sent, if its close payload carried one; the code to answer a close
/// payload that RFC 6455 forbids with (section 7.4: a one-byte payload, a code no endpoint may
/// send, a reason that is not UTF-8).
pub fn close_code_of(payload: &[u8]) -> Result<Option<u16>, CloseCode> {
    match payload {
        [] => Ok(None),
        [_] => Err(CloseCode::ProtocolError),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            // RFC 6455's codes and the IANA registry's 1012–1014 (this server sends 1013).
            let sendable = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !sendable {
                return Err(CloseCode::ProtocolError);
            }
            match std::str::from_utf8(reason) {
                Ok(_) => Ok(Some(code)),
                Err(_) => Err(CloseCode::InvalidPayload),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peers_close_payload_is_checked() {
        assert_eq!(close_code_of(b""), Ok(None));
        assert_eq!(close_code_of(&[0x03, 0xE8]), Ok(Some(1000)));
        assert_eq!(close_code_of(&[0x0F, 0xA0, b'o', b'k']), Ok(Some(4000)));
        assert_eq!(close_code_of(&[0x03, 0xF5]), Ok(Some(1013)));
        for bad in [
            &[0x03][..],
            &[0x03, 0xEE],
            &[0x03, 0xED],
            &[0x03, 0xF7],
            &[0x00, 0x00],
            &[0x13, 0x88],
        ] {
            assert_eq!(close_code_of(bad), Err(CloseCode::ProtocolError), "{bad:?}");
        }
        assert_eq!(
            close_code_of(&[0x03, 0xE8, 0xFF]),
            Err(CloseCode::InvalidPayload)
        );
    }

    fn client_frame(fin: bool, opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut plain = frame(opcode, payload).to_vec();
        if !fin {
            plain[0] &= 0x7F;
        }
        let h = header_len(payload.len());
        plain[1] |= 0x80;
        let mut out = plain[..h].to_vec();
        out.extend_from_slice(&mask);
        let mut body = payload.to_vec();
        unmask(&mut body, mask);
        out.extend_from_slice(&body);
        out
    }

    #[test]
    fn builds_frames_with_each_length_form() {
        for len in [0usize, 125, 126, 65_535, 65_536, 200_000] {
            let payload = vec![b'x'; len];
            let f = frame(OP_TEXT, &payload);
            assert_eq!(f.len(), header_len(len) + len);
            assert_eq!(f[0], 0x81);
            assert_eq!(payload_of(&f), &payload[..]);
            let mut reader =
                tungstenite::protocol::frame::FrameHeader::parse(&mut std::io::Cursor::new(&f[..]))
                    .unwrap()
                    .unwrap();
            assert_eq!(
                reader.1 as usize, len,
                "tungstenite reads our length for {len}"
            );
            assert!(reader.0.is_final);
            reader.0.mask = None;
        }
    }

    #[test]
    fn close_frame_carries_code_and_reason() {
        let f = close(CloseCode::SlowConsumer);
        assert_eq!(f[0], 0x88);
        assert_eq!(close_code_of(&f[2..]), Ok(Some(1013)));
        assert_eq!(&f[4..], b"slow consumer");
    }

    #[test]
    fn parses_masked_client_frames_incrementally() {
        let payload = b"{\"type\":\"ping\"} and some more bytes to unmask";
        let bytes = client_frame(true, OP_TEXT, payload, [1, 2, 3, 4]);
        for cut in 0..6 {
            assert_eq!(parse_frame(&bytes[..cut], 1024), Ok(None));
        }
        let head = parse_frame(&bytes, 1024).unwrap().unwrap();
        assert_eq!(
            (head.fin, head.opcode, head.payload_len, head.header_len),
            (true, OP_TEXT, payload.len(), 6)
        );
        let mut body = bytes[head.header_len..].to_vec();
        unmask(&mut body, head.mask);
        assert_eq!(body, payload);
    }

    #[test]
    fn unmask_matches_bytewise_xor_at_every_length() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len as u8).collect();
            let mask = [0xA1, 0x02, 0xF3, 0x44];
            let mut fast = data.clone();
            unmask(&mut fast, mask);
            let slow: Vec<u8> = data
                .iter()
                .enumerate()
                .map(|(i, b)| b ^ mask[i % 4])
                .collect();
            assert_eq!(fast, slow);
        }
    }

    #[test]
    fn rejects_protocol_violations() {
        let mut unmasked = frame(OP_TEXT, b"hi").to_vec();
        assert_eq!(parse_frame(&unmasked, 10), Err(FrameError::Unmasked));
        unmasked[0] |= 0x40;
        assert_eq!(parse_frame(&unmasked, 10), Err(FrameError::Reserved));
        let big = client_frame(true, OP_TEXT, &[b'a'; 300], [0; 4]);
        assert_eq!(parse_frame(&big, 299), Err(FrameError::TooBig));
        assert_eq!(FrameError::TooBig.close_code().code(), 1009);
        let fragmented_ping = client_frame(false, OP_PING, b"x", [0; 4]);
        assert_eq!(
            parse_frame(&fragmented_ping, 10),
            Err(FrameError::BadControl)
        );
        let bad_opcode = client_frame(true, 0x3, b"x", [0; 4]);
        assert_eq!(parse_frame(&bad_opcode, 10), Err(FrameError::Reserved));
    }
}
