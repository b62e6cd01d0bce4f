// A real HDFS for lakecache's tests (e2e/src/hdfs.rs): Hadoop's MiniDFSCluster, one namenode and
// one datanode in this JVM, everything on 127.0.0.1.
//
//   java -Xmx512m -cp "$LAKECACHE_HDFS_HOME/classes:$LAKECACHE_HDFS_HOME/lib/*" \
//       MiniHdfs <namenode-port, 0 for a free one> <base-dir>
//
// Once the cluster is up it creates /private (0700, owned by the launching user) holding
// /private/secret.bin, and /shared (0700, owned by the HDFS user `alice`) holding
// /shared/alice.bin, so tests can see one HDFS user let in and another refused; then prints exactly one
// line, `READY <namenode-port>`, on stdout, and serves until stdin reaches EOF or SIGTERM comes,
// when it shuts the cluster down. Everything else (Hadoop's logs, errors) goes to stderr; any
// startup error exits non-zero.
//
// Built by scripts/setup against the jars that tools/hdfs/pom.xml pins.

import java.io.File;
import java.io.IOException;
import java.io.InputStream;
import java.io.PrintStream;
import java.nio.charset.StandardCharsets;

import org.apache.hadoop.conf.Configuration;
import org.apache.hadoop.fs.FSDataOutputStream;
import org.apache.hadoop.fs.FileSystem;
import org.apache.hadoop.fs.Path;
import org.apache.hadoop.fs.permission.FsPermission;
import org.apache.hadoop.hdfs.MiniDFSCluster;

import sun.misc.Signal;

public final class MiniHdfs {
    private static volatile MiniDFSCluster cluster;
    private static boolean stopped;

    public static void main(String[] args) {
        // stdout carries the READY line and nothing else: whatever Hadoop prints goes to stderr.
        PrintStream ready = System.out;
        System.setOut(System.err);
        // Before any logger exists: slf4j-simple (tools/hdfs/pom.xml) on stderr, at WARN unless
        // -Dorg.slf4j.simpleLogger.defaultLogLevel=... says otherwise.
        if (System.getProperty("org.slf4j.simpleLogger.defaultLogLevel") == null) {
            System.setProperty("org.slf4j.simpleLogger.defaultLogLevel", "warn");
        }
        System.setProperty("org.slf4j.simpleLogger.logFile", "System.err");
        System.setProperty("org.slf4j.simpleLogger.showDateTime", "true");
        System.setProperty("org.slf4j.simpleLogger.dateTimeFormat", "HH:mm:ss.SSS");
        if (args.length != 2) {
            System.err.println("usage: MiniHdfs <namenode-port, 0 for a free one> <base-dir>");
            System.exit(2);
        }
        try {
            int port = Integer.parseInt(args[0]);
            File base = new File(args[1]).getAbsoluteFile();
            // SIGTERM (and ^C) take the same way out as stdin's EOF. Not a shutdown hook: once the
            // JVM is shutting down, Hadoop's own shutdown fails (it removes hooks of its own).
            for (String sig : new String[] {"TERM", "INT"}) {
                Signal.handle(new Signal(sig), s -> {
                    stop();
                    System.exit(0);
                });
            }
            start(port, base);
            ready.println("READY " + cluster.getNameNodePort());
            ready.flush();
        } catch (Throwable e) {
            System.err.println("MiniHdfs: startup failed: " + e);
            e.printStackTrace();
            System.err.flush();
            // halt, not exit: a half-started cluster's threads or hooks must not keep us alive.
            Runtime.getRuntime().halt(1);
        }
        // Serve until stdin reaches EOF: the parent closed it, or died. (Or a signal comes.)
        try {
            InputStream in = System.in;
            byte[] buf = new byte[256];
            while (in.read(buf) >= 0) {
                // Input means nothing; only its end does.
            }
        } catch (IOException e) {
            System.err.println("MiniHdfs: reading stdin: " + e);
        }
        stop();
        System.exit(0);
    }

    private static void start(int port, File base) throws IOException {
        // Nothing outside base: Hadoop's and Jetty's scratch files (Jetty unpacks its web apps
        // under java.io.tmpdir) go to base/tmp.
        File tmp = new File(base, "tmp");
        if (!tmp.isDirectory() && !tmp.mkdirs()) {
            throw new IOException("could not create " + tmp);
        }
        System.setProperty("java.io.tmpdir", tmp.getPath());
        Configuration conf = new Configuration();
        conf.set("hadoop.tmp.dir", tmp.getPath());
        // MiniDFSCluster names the namenode "localhost": bind it to 127.0.0.1 whatever that
        // resolves to.
        for (String server : new String[] {"rpc", "servicerpc", "http", "https"}) {
            conf.set("dfs.namenode." + server + "-bind-host", "127.0.0.1");
        }
        // Every HTTP server on a loopback port of its own choosing; WebHDFS off (nothing uses it).
        conf.set("dfs.namenode.http-address", "127.0.0.1:0");
        conf.set("dfs.namenode.https-address", "127.0.0.1:0");
        conf.set("dfs.datanode.http.address", "127.0.0.1:0");
        conf.set("dfs.datanode.https.address", "127.0.0.1:0");
        conf.set("dfs.datanode.address", "127.0.0.1:0");
        conf.set("dfs.datanode.ipc.address", "127.0.0.1:0");
        conf.setBoolean("dfs.webhdfs.enabled", false);
        // Small: few handler threads, one replica, no background scanners.
        conf.setInt("dfs.replication", 1);
        conf.setInt("dfs.namenode.handler.count", 4);
        conf.setInt("dfs.namenode.service.handler.count", 2);
        conf.setInt("dfs.datanode.handler.count", 2);
        conf.setInt("dfs.datanode.scan.period.hours", -1);
        conf.setInt("dfs.datanode.directoryscan.interval", -1);
        // Permissions stay on (the default): tests rely on another user being refused.
        conf.setBoolean("dfs.permissions.enabled", true);

        cluster = new MiniDFSCluster.Builder(conf, base)
                .nameNodePort(port)
                .nameNodeHttpPort(0)
                .numDataNodes(1)
                .storagesPerDatanode(1)
                .checkDataNodeAddrConfig(true)
                .format(true)
                .build();
        cluster.waitActive();

        FileSystem fs = cluster.getFileSystem();
        Path dir = new Path("/private");
        if (!fs.mkdirs(dir)) {
            throw new IOException("could not create " + dir);
        }
        // mkdirs applies the umask; the mode is set explicitly.
        fs.setPermission(dir, new FsPermission((short) 0700));
        try (FSDataOutputStream out = fs.create(new Path(dir, "secret.bin"), false)) {
            out.write("not for other users\n".getBytes(StandardCharsets.UTF_8));
        }
        Path shared = new Path("/shared");
        Path alices = new Path(shared, "alice.bin");
        if (!fs.mkdirs(shared)) {
            throw new IOException("could not create " + shared);
        }
        try (FSDataOutputStream out = fs.create(alices, false)) {
            out.write("for alice\n".getBytes(StandardCharsets.UTF_8));
        }
        fs.setPermission(shared, new FsPermission((short) 0700));
        fs.setOwner(shared, "alice", null);
        fs.setOwner(alices, "alice", null);
    }

    private static synchronized void stop() {
        if (stopped || cluster == null) {
            return;
        }
        stopped = true;
        try {
            cluster.shutdown();
        } catch (Throwable e) {
            System.err.println("MiniHdfs: shutdown: " + e);
        }
    }
}
