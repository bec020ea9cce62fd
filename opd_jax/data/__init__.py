"""Data: TFDS builders (array_record, no TensorFlow), prompts and chat templates, math grading."""
