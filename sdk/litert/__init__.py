"""The LiteRT toolkit the LiteRT targets (``arm-int8``, ``arm-fp32``, ``fp16-gpu``) share.

From graph to ``.tflite`` and back, with no TensorFlow involved:

:mod:`.lowering`
    a canonical :class:`sdk.graph.Graph` to a LiteRT flatbuffer (int8, float32,
    or float32 with float16 weights), written through
:mod:`.flatbuffer`
    the writer (and reader) of the LiteRT schema: :class:`~.flatbuffer.ModelBuilder`;
:mod:`.fbcheck`
    the structural check every runner applies to a ``model.tflite`` before a
    runtime reads it (the writer does not call it: who needs a file checked
    calls it);
:mod:`.reference`
    the numpy re-execution of a flatbuffer with LiteRT's integer arithmetic,
    built on :mod:`.qmath` (the runtime's requantization and rounding);
:mod:`.runtime`
    the LiteRT interpreter on this machine: load, run, delegation, timing;
:mod:`.runners`
    the ``host`` and ``reference`` runner classes and the pieces every LiteRT
    runner shares (:func:`~.runners.checked_model`, :func:`~.runners.adapt`);
:mod:`.qemu`
    the ``qemu-aarch64`` runner class: the same file in the aarch64 LiteRT on
    an emulated ARM64 Linux (:mod:`sdk.qemu`);
:mod:`.layout` and :mod:`.padding`
    the runtime's rules both sides must agree on: the stored (NHWC) layout of
    model inputs and outputs, and TFLite's SAME padding;
:mod:`.target`
    :class:`~.target.LiteRTTarget`, prepare / check / pack through the lowering.

Importing this package imports none of them (the lowering and the runtime pull
in numpy, the LiteRT schema or the LiteRT interpreter).
"""
