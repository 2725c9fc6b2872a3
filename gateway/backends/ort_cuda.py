"""IO binding for CUDA sessions: inputs copied once to the device, outputs allocated there.

Imported only when a session runs on CUDA, so CPU-only machines never load this path.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort


class IoBindingRunner:
    def __init__(self, session: ort.InferenceSession, device: str) -> None:
        self.session = session
        self.device_id = int(device.split(":", 1)[1]) if ":" in device else 0

    def run(self, feed: dict[str, np.ndarray], outputs: Sequence[str]) -> dict[str, np.ndarray]:
        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in outputs:
            binding.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return dict(zip(outputs, binding.copy_outputs_to_cpu(), strict=True))
