"""Test doubles that ship with the package: `synth.testing.loopback` is a loopback OpenAI-compatible server
(one asyncio event loop) used by the tests, the benchmarks under bench/ and the demo's stand-in server."""
