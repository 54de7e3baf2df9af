#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| agent_protocol::fuzzing::frames(data));
