"""The generated wire contract (`stepstream.v1`): `stepstream_pb2` and `stepstream_pb2_grpc`.

Both modules are compiled from the repository's `proto/stepstream/v1/stepstream.proto` when the
package is built (`pip install ./clients/python`); they are not committed.
"""
