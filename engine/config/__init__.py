"""Configuration: YAML loading with positions, frozen models, policy presets, JSON Schema."""
