//! Entry points for fuzzing (`fuzz/`, and the stable smoke test that runs them on kept
//! inputs): what a peer can send must decode or fail cleanly, never panic, never make the
//! decoder allocate past [`MAX_FRAME`](crate::MAX_FRAME), and what decodes must survive a
//! round trip.

use crate::{read_frame, write_frame, Hello, Request, Response};

fn roundtrip<T>(data: &[u8])
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let mut input = data;
    // Decode frames until the input is used up or one fails.
    while let Ok(msg) = read_frame::<_, T>(&mut input) {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, &msg).expect("a decoded message encodes");
        let again: T = read_frame(&mut bytes.as_slice()).expect("an encoded message decodes");
        assert_eq!(again, msg, "round trip");
    }
}

/// Feeds `data` to the frame decoder as each message type a peer can send.
pub fn frames(data: &[u8]) {
    roundtrip::<Hello>(data);
    roundtrip::<Request>(data);
    roundtrip::<Response>(data);
}
