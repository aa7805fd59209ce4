import torch
from torch.nn.utils.rnn import PackedSequence

from .. import functional as NF

__all__ = ["LSTM", "LSTMCell"]


class LSTMCell(torch.nn.LSTMCell):
    """torch.nn.LSTMCell computed by nnkernels (constructor, parameters weight_ih / weight_hh /
    bias_ih / bias_hh, init and state_dict are torch's)."""

    def forward(self, input, hx=None):
        return NF.lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)


class LSTM(torch.nn.LSTM):
    """torch.nn.LSTM computed by nnkernels: the same constructor (input_size, hidden_size,
    num_layers, bias, batch_first, dropout, bidirectional), parameters (weight_ih_l0,
    weight_hh_l1_reverse, ...), init and state_dict; forward(input, hx=None) -> (output,
    (h_n, c_n)). proj_size and PackedSequence input raise NotImplementedError."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.proj_size:
            raise NotImplementedError(
                f"nnkernels.nn.LSTM: proj_size={self.proj_size} is not supported (use "
                "torch.nn.LSTM for projected LSTMs)"
            )

    def forward(self, input, hx=None):
        if isinstance(input, PackedSequence):
            raise NotImplementedError(
                "nnkernels.nn.LSTM: PackedSequence input is not supported; pass a padded tensor "
                "(torch.nn.utils.rnn.pad_packed_sequence) or use torch.nn.LSTM"
            )
        params = [getattr(self, name) for name in self._flat_weights_names]
        return NF.lstm(
            input,
            hx,
            params,
            self.bias,
            self.num_layers,
            self.dropout,
            self.training,
            self.bidirectional,
            self.batch_first,
        )
