"""Using a trained encoder on new images: load it (run directory or registry), embed batches on
the device, write embedding tables (`sslflow embed`), the MLflow pyfunc that takes image bytes,
and the ONNX export. Issue 16 (drift, near-duplicates, selection) builds on `encoder`:

    encoder, meta = load_encoder_for_embedding("models:/ssl-encoder@champion")   # or a run dir
    features = embed_images(encoder, images_uint8_nhwc, batch_size=256, device="cuda")
"""
