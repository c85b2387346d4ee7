"""The backends LocalAI's model-import form offers (`GET /backends/known`), as LocalAI 82c191a lists them.

LocalAI builds the list from code, not from a gallery: its importer registry
(core/gallery/importers/*.go: name, modality, whether it recognises models by itself), the llama-cpp
importer's drop-in replacements, and a curated list of backends that are only ever chosen by
preference (core/http/endpoints/localai/backend.go). The portal has no importers, so it carries that
list as data; the route adds every installed backend name, as LocalAI does. Only LocalAI's own UI
reads it (the import form's dropdown), which is why it is a table here and nothing more.
"""

from __future__ import annotations

from typing import NamedTuple


class KnownBackend(NamedTuple):
    name: str
    modality: str
    auto_detect: bool
    description: str


KNOWN_BACKENDS: tuple[KnownBackend, ...] = (
    KnownBackend("trellis2cpp", "3d", True, ""),
    KnownBackend("crispasr", "asr", False, "CrispASR multi-architecture transcription (preference-only)"),
    KnownBackend("faster-whisper", "asr", True, ""),
    KnownBackend("moonshine", "asr", True, ""),
    KnownBackend("moss-transcribe-cpp", "asr", True, ""),
    KnownBackend("nemo", "asr", True, ""),
    KnownBackend(
        "nemo-speech-cpp",
        "asr",
        False,
        (
            "NVIDIA NeMo-Speech.cpp: Nemotron ASR (offline, streaming and live), Sortformer diarization, "
            "MagpieTTS speech synthesis and Riva-Translate translation, chosen from the model's GGUF "
            "architecture (preference-only)"
        ),
    ),
    KnownBackend("parakeet-cpp", "asr", True, ""),
    KnownBackend("qwen-asr", "asr", True, ""),
    KnownBackend("whisper", "asr", True, ""),
    KnownBackend("whisperx", "asr", False, "WhisperX transcription (preference-only)"),
    KnownBackend(
        "localvqe",
        "audio-transform",
        False,
        "LocalVQE C++ joint AEC + noise suppression + dereverberation (preference-only)",
    ),
    KnownBackend("locate-anything-cpp", "detection", True, ""),
    KnownBackend("rfdetr", "detection", True, ""),
    KnownBackend("sam3-cpp", "detection", False, "SAM3 C++ object detection (preference-only)"),
    KnownBackend("sentencetransformers", "embeddings", True, ""),
    KnownBackend("ace-step", "image", True, ""),
    KnownBackend("depth-anything", "image", True, ""),
    KnownBackend("diffusers", "image", True, ""),
    KnownBackend("stablediffusion-ggml", "image", True, ""),
    KnownBackend("rerankers", "reranker", True, ""),
    KnownBackend("ds4", "text", True, ""),
    KnownBackend("ik-llama-cpp", "text", False, "GGUF drop-in replacement for llama-cpp with ik-quants"),
    KnownBackend("llama-cpp", "text", True, ""),
    KnownBackend("mlx", "text", True, ""),
    KnownBackend("mlx-vlm", "text", False, "MLX vision-language models (preference-only)"),
    KnownBackend("privacy-filter", "text", True, ""),
    KnownBackend("sglang", "text", False, "SGLang runtime (preference-only)"),
    KnownBackend("tinygrad", "text", False, "tinygrad runtime (preference-only)"),
    KnownBackend("transformers", "text", True, ""),
    KnownBackend("trl", "text", False, "Transformers Reinforcement Learning (preference-only)"),
    KnownBackend(
        "turboquant", "text", False, "GGUF drop-in replacement for llama-cpp with TurboQuant optimizations"
    ),
    KnownBackend("vllm", "text", True, ""),
    KnownBackend(
        "vllm-cpp",
        "text",
        False,
        "vLLM-style continuous-batching engine (vllm.cpp) consuming GGUF, by the LocalAI team",
    ),
    KnownBackend("vllm-omni", "text", True, ""),
    KnownBackend(
        "audio-cpp",
        "tts",
        False,
        (
            "audio.cpp multi-family audio engine: TTS, voice cloning, ASR, alignment, VAD, diarization, "
            "separation, music generation (preference-only)"
        ),
    ),
    KnownBackend("bark", "tts", True, ""),
    KnownBackend("chatterbox", "tts", True, ""),
    KnownBackend("coqui", "tts", True, ""),
    KnownBackend("faster-qwen3-tts", "tts", False, "Faster Qwen3 TTS (preference-only)"),
    KnownBackend("fish-speech", "tts", True, ""),
    KnownBackend("kitten-tts", "tts", True, ""),
    KnownBackend("kokoro", "tts", True, ""),
    KnownBackend("kokoros", "tts", False, "Kokoros TTS (preference-only)"),
    KnownBackend("liquid-audio", "tts", True, ""),
    KnownBackend("magpie-tts-cpp", "tts", False, "Magpie TTS Multilingual C++ (preference-only)"),
    KnownBackend(
        "mlx-audio", "tts", False, "MLX-Audio text-to-speech models (auto-detected; pref-only fallback)"
    ),
    KnownBackend("neutts", "tts", True, ""),
    KnownBackend(
        "omnivoice-cpp",
        "tts",
        False,
        "OmniVoice C++ TTS with voice cloning and voice design (preference-only)",
    ),
    KnownBackend("outetts", "tts", True, ""),
    KnownBackend("piper", "tts", True, ""),
    KnownBackend("qwen-tts", "tts", False, "Qwen TTS (preference-only)"),
    KnownBackend("qwen3-tts-cpp", "tts", False, "Qwen3 TTS C++ (preference-only)"),
    KnownBackend("supertonic", "tts", False, "Supertonic multilingual ONNX TTS (preference-only)"),
    KnownBackend("vibevoice", "tts", True, ""),
    KnownBackend("vibevoice-cpp", "tts", True, ""),
    KnownBackend("voxcpm", "tts", True, ""),
    KnownBackend("silero-vad", "vad", True, ""),
    KnownBackend("longcat-video", "video", True, ""),
)
