using TorchSharp;
using Xunit;

namespace Moe.Runtime.Tests;

public class TorchLoadsTests
{
    [Fact]
    public void MatrixProduct_ComputesOnCpu()
    {
        using var a = torch.tensor(new float[] { 1, 2, 3, 4 }).reshape(2, 2);
        using var b = torch.tensor(new float[] { 5, 6, 7, 8 }).reshape(2, 2);
        using var c = a.matmul(b);
        Assert.Equal(new float[] { 19, 22, 43, 50 }, c.data<float>().ToArray());
    }
}
