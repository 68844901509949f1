#nullable enable
// Compiled by MSBuild's RoslynCodeTaskFactory (see LibTorchSharpLoad.targets); no tool beyond the .NET SDK.
using System;
using System.IO;
using System.Text;
using Microsoft.Build.Framework;
using Microsoft.Build.Utilities;

/// <summary>
/// Marks one symbol-version need of an ELF64 shared library WEAK (VER_FLG_WEAK) when the host's
/// libstdc++ does not define that version. Walks the .gnu.version_r chain; no hard-coded offsets.
/// </summary>
public class WeakenElfVersionNeed : Task
{
    [Required] public ITaskItem[] Files { get; set; } = Array.Empty<ITaskItem>();
    [Required] public string Version { get; set; } = "";

    private const uint ShtGnuVerdef = 0x6ffffffd;
    private const uint ShtGnuVerneed = 0x6ffffffe;
    private const ushort VerFlgWeak = 0x2;

    public override bool Execute()
    {
        string? host = FindHostLibStdCxx();
        if (host is null)
        {
            Log.LogMessage(MessageImportance.Low, "No libstdc++.so.6 found on this host; leaving libLibTorchSharp.so as it is.");
            return true;
        }
        if (DefinesVersion(File.ReadAllBytes(host), Version))
        {
            Log.LogMessage(MessageImportance.Low, $"{host} defines {Version}; libLibTorchSharp.so left untouched.");
            return true;
        }
        foreach (var item in Files)
        {
            string path = item.ItemSpec;
            byte[] elf = File.ReadAllBytes(path);
            int flagsOffset = FindVersionNeedFlags(elf, Version, out ushort flags);
            if (flagsOffset < 0)
            {
                Log.LogMessage(MessageImportance.Low, $"{path} has no need for {Version}.");
                continue;
            }
            if ((flags & VerFlgWeak) != 0) continue;
            ushort weak = (ushort)(flags | VerFlgWeak);
            using (var fs = new FileStream(path, FileMode.Open, FileAccess.Write))
            {
                fs.Position = flagsOffset;
                fs.WriteByte((byte)(weak & 0xff));
                fs.WriteByte((byte)(weak >> 8));
            }
            Log.LogMessage(MessageImportance.Normal,
                $"{path}: marked the {Version} need WEAK ({flags} -> {weak}) because {host} lacks it.");
        }
        return !Log.HasLoggedErrors;
    }

    private static string? FindHostLibStdCxx()
    {
        string[] candidates =
        {
            "/usr/lib/x86_64-linux-gnu/libstdc++.so.6", "/lib/x86_64-linux-gnu/libstdc++.so.6",
            "/usr/lib64/libstdc++.so.6", "/lib64/libstdc++.so.6", "/usr/lib/libstdc++.so.6",
            "/usr/lib/aarch64-linux-gnu/libstdc++.so.6",
        };
        foreach (var c in candidates) if (File.Exists(c)) return c;
        return null;
    }

    private struct Section { public uint Type; public ulong Offset; public ulong Size; public uint Link; }

    private static Section[] Sections(byte[] b)
    {
        if (b.Length < 64 || b[0] != 0x7f || b[1] != (byte)'E' || b[2] != (byte)'L' || b[3] != (byte)'F' || b[4] != 2 || b[5] != 1)
            throw new InvalidDataException("not a little-endian ELF64 file");
        ulong shoff = BitConverter.ToUInt64(b, 0x28);
        int shentsize = BitConverter.ToUInt16(b, 0x3a);
        int shnum = BitConverter.ToUInt16(b, 0x3c);
        var result = new Section[shnum];
        for (int i = 0; i < shnum; i++)
        {
            int o = checked((int)shoff + i * shentsize);
            result[i] = new Section
            {
                Type = BitConverter.ToUInt32(b, o + 4),
                Offset = BitConverter.ToUInt64(b, o + 0x18),
                Size = BitConverter.ToUInt64(b, o + 0x20),
                Link = BitConverter.ToUInt32(b, o + 0x28),
            };
        }
        return result;
    }

    private static string CString(byte[] b, ulong offset)
    {
        int start = checked((int)offset), end = start;
        while (end < b.Length && b[end] != 0) end++;
        return Encoding.ASCII.GetString(b, start, end - start);
    }

    /// <summary>Returns the file offset of the vna_flags field of the need for <paramref name="version"/>, or -1.</summary>
    public static int FindVersionNeedFlags(byte[] b, string version, out ushort flags)
    {
        flags = 0;
        var sections = Sections(b);
        foreach (var s in sections)
        {
            if (s.Type != ShtGnuVerneed) continue;
            ulong strtab = sections[s.Link].Offset;
            ulong vn = s.Offset;
            while (true)
            {
                ushort cnt = BitConverter.ToUInt16(b, (int)vn + 2);
                uint aux = BitConverter.ToUInt32(b, (int)vn + 8);
                uint next = BitConverter.ToUInt32(b, (int)vn + 12);
                ulong vna = vn + aux;
                for (int i = 0; i < cnt; i++)
                {
                    uint name = BitConverter.ToUInt32(b, (int)vna + 8);
                    if (CString(b, strtab + name) == version)
                    {
                        flags = BitConverter.ToUInt16(b, (int)vna + 4);
                        return (int)vna + 4;
                    }
                    uint vnaNext = BitConverter.ToUInt32(b, (int)vna + 12);
                    if (vnaNext == 0) break;
                    vna += vnaNext;
                }
                if (next == 0) break;
                vn += next;
            }
        }
        return -1;
    }

    public static bool DefinesVersion(byte[] b, string version)
    {
        var sections = Sections(b);
        foreach (var s in sections)
        {
            if (s.Type != ShtGnuVerdef) continue;
            ulong strtab = sections[s.Link].Offset;
            ulong vd = s.Offset;
            while (true)
            {
                ushort cnt = BitConverter.ToUInt16(b, (int)vd + 6);
                uint aux = BitConverter.ToUInt32(b, (int)vd + 12);
                uint next = BitConverter.ToUInt32(b, (int)vd + 16);
                if (cnt > 0)
                {
                    uint name = BitConverter.ToUInt32(b, (int)(vd + aux));
                    if (CString(b, strtab + name) == version) return true;
                }
                if (next == 0) break;
                vd += next;
            }
        }
        return false;
    }
}
