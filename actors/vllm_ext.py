"""placeholder"""
class WeightReload:
    def odpo_reload(self, blob: bytes) -> int:
        from safetensors.torch import load
        tensors = load(blob)
        self.reload_weights(weights_iterator=iter(tensors.items()), is_checkpoint_format=True)
        return len(tensors)
